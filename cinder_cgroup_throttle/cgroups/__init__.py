"""Find the host's block-I/O cgroup controller and return the driver for it.

The mount table decides, never a hard-coded path: a v1 hierarchy with ``blkio`` (legacy or
hybrid layout) wins, since a controller bound to v1 is absent from v2; otherwise a cgroup2
mount whose root lists ``io`` in ``cgroup.controllers`` (unified layout).
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional

from cinder_cgroup_throttle.cgroups.base import (  # noqa: F401  (re-exported)
    CgroupDriver, DeviceLimit, validate_cgroup_path)
from cinder_cgroup_throttle.cgroups.blkio_v1 import BlkioV1Driver
from cinder_cgroup_throttle.cgroups.io_v2 import IoV2Driver
from cinder_cgroup_throttle.devices import MOUNTINFO
from cinder_cgroup_throttle.exception import CgroupUnavailable


@dataclasses.dataclass
class CgroupHost:
    """What the mount table says about block-I/O cgroups on this host."""

    layout: str  # 'legacy', 'hybrid', 'unified' or 'none'
    v1_blkio: Optional[str] = None  # mountpoint of the v1 blkio hierarchy
    v1_blkio_readonly: bool = False
    v2_root: Optional[str] = None  # mountpoint of the cgroup2 hierarchy
    v2_readonly: bool = False
    v2_mount_root: str = '/'  # the cgroup the mount shows as its root (mountinfo field 4)
    v2_controllers: List[str] = dataclasses.field(default_factory=list)

    @property
    def v2_io(self) -> bool:
        return 'io' in self.v2_controllers


def detect(mountinfo: str = MOUNTINFO) -> CgroupHost:
    host = CgroupHost(layout='none')
    has_v1 = False
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            sep = fields.index('-')
            fstype, super_opts = fields[sep + 1], fields[sep + 3].split(',')
            readonly = 'ro' in fields[5].split(',') or 'ro' in super_opts
            if fstype == 'cgroup':
                has_v1 = True
                if 'blkio' in super_opts and host.v1_blkio is None:
                    host.v1_blkio, host.v1_blkio_readonly = fields[4], readonly
            elif fstype == 'cgroup2' and host.v2_root in (None, fields[4]):
                # A later mount on the same point covers the earlier one (a container's
                # own cgroup2 mounted over the host's).
                host.v2_root, host.v2_readonly = fields[4], readonly
                host.v2_mount_root = fields[3]
    if host.v2_root:
        try:
            with open(os.path.join(host.v2_root, 'cgroup.controllers')) as f:
                host.v2_controllers = f.read().split()
        except OSError:
            pass
    if has_v1:
        host.layout = 'hybrid' if host.v2_root else 'legacy'
    elif host.v2_root:
        host.layout = 'unified'
    return host


def _check_writable(path: str, readonly: bool) -> None:
    if readonly:
        raise CgroupUnavailable('cgroup filesystem at %s is mounted read-only' % path)
    if not os.access(path, os.W_OK):
        raise CgroupUnavailable('cgroup filesystem at %s is not writable by uid %d'
                                % (path, os.geteuid()))


def get_driver(parent: str, host: Optional[CgroupHost] = None,
               check_writable: bool = True) -> CgroupDriver:
    """Driver for this host; CgroupUnavailable says why none can be used.

    ``check_writable=False`` is for callers that write through the root helper
    (privileged.PrivilegedDriver); a read-only mount is refused either way.
    """
    host = host or detect()
    if host.v1_blkio:
        if check_writable or host.v1_blkio_readonly:
            _check_writable(host.v1_blkio, host.v1_blkio_readonly)
        return BlkioV1Driver(host.v1_blkio, parent)
    if host.v2_root and host.v2_io:
        if check_writable or host.v2_readonly:
            _check_writable(host.v2_root, host.v2_readonly)
        return IoV2Driver(host.v2_root, parent)
    if host.v2_root:
        raise CgroupUnavailable(
            'cgroup v2 at %s has no io controller (controllers: %s) and no v1 blkio '
            'hierarchy is mounted' % (host.v2_root, ' '.join(host.v2_controllers) or 'none'))
    raise CgroupUnavailable('no cgroup filesystem is mounted (see /proc/self/mountinfo)')
