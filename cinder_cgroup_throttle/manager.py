"""Active copies of one process: per-copy cgroup lifecycle, limits, live re-limit.

This is the engine behind the Cinder-facing throttle and the CLI; it has no Cinder import
so that the CLI starts fast and works where Cinder is not installed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import threading
import time
from typing import Dict, Iterator, List, Optional

from cinder_cgroup_throttle import devices
from cinder_cgroup_throttle.cgroups import CgroupDriver, DeviceLimit, get_driver
from cinder_cgroup_throttle.cgroups.base import validate_cgroup_path
from cinder_cgroup_throttle.exception import (CgroupUnavailable, CopyNotFound,
                                              ThrottleError)
from cinder_cgroup_throttle.limits import plan_limits
from cinder_cgroup_throttle.units import format_rate

LOG = logging.getLogger(__name__)

DEFAULT_CGROUP = 'cinder-volume-copy'


@dataclasses.dataclass
class ActiveCopy:
    """One throttled copy, from ``subcommand`` entry to exit."""

    id: str
    src: str
    dst: str
    src_dev: Optional[devices.BlockDevice]
    dst_dev: Optional[devices.BlockDevice]
    bps_limit: int
    backend: str
    reason: str
    prefix: List[str]
    limits: List[DeviceLimit]
    started: float = dataclasses.field(default_factory=time.time)
    volume_id: Optional[str] = None


def new_copy_id() -> str:
    """Unique, cgroup-safe id; the pid lets a later cleanup tell a dead owner's leftovers."""
    return 'copy-%d-%s' % (os.getpid(), secrets.token_hex(4))


class CopyManager:
    """Creates a leaf cgroup with the copy's limits for every copy, and removes it after."""

    def __init__(self, cgroup_name: str = DEFAULT_CGROUP, grace: float = 10.0,
                 driver: Optional[CgroupDriver] = None) -> None:
        self.cgroup_name = validate_cgroup_path(cgroup_name)
        self.grace = grace
        self._lock = threading.Lock()
        self._copies: Dict[str, ActiveCopy] = {}
        self._unavailable: Optional[CgroupUnavailable] = None
        self.driver: Optional[CgroupDriver] = driver
        if driver is None:
            try:
                self.driver = get_driver(self.cgroup_name)
            except CgroupUnavailable as exc:
                LOG.warning('cgroup throttling unavailable: %s', exc)
                self._unavailable = exc

    @contextlib.contextmanager
    def copy(self, src: str, dst: str, bps_limit: int,
             volume_id: Optional[str] = None) -> Iterator[ActiveCopy]:
        """Throttle one copy of ``src`` to ``dst`` at ``bps_limit`` bytes/s.

        Paths are checked before anything is created: a missing source raises
        DeviceResolutionError and leaves no trace.
        """
        src_dev = devices.resolve(src, must_exist=True)
        dst_dev = devices.resolve(dst, must_exist=False)
        limits = plan_limits(src_dev, dst_dev, bps_limit)
        if not limits:
            raise ThrottleError('neither %s nor %s is on a block device: a cgroup cannot '
                                'throttle this copy' % (src, dst))
        if self.driver is None:
            raise self._unavailable or CgroupUnavailable('no cgroup driver')
        driver = self.driver
        copy_id = new_copy_id()
        driver.create_leaf(copy_id)
        try:
            driver.write_limits(copy_id, limits)
            copy = ActiveCopy(
                id=copy_id, src=src, dst=dst, src_dev=src_dev, dst_dev=dst_dev,
                bps_limit=bps_limit, backend='cgroup',
                reason='%s limit on %s' % (driver.controller, limits[0].device),
                prefix=driver.prefix(copy_id), limits=limits, volume_id=volume_id)
            with self._lock:
                self._copies[copy_id] = copy
            LOG.info('copy %s: %s -> %s at %s, %s', copy_id, src, dst,
                     format_rate(bps_limit), copy.reason)
            try:
                yield copy
            finally:
                with self._lock:
                    self._copies.pop(copy_id, None)
        finally:
            killed = driver.remove_leaf(copy_id, self.grace)
            if killed:
                LOG.warning('copy %s: killed leftover processes %s before removing its '
                            'cgroup', copy_id, killed)

    def active(self) -> List[ActiveCopy]:
        with self._lock:
            return list(self._copies.values())

    def find(self, ident: str) -> ActiveCopy:
        """An active copy by copy id or volume id."""
        with self._lock:
            for copy in self._copies.values():
                if ident in (copy.id, copy.volume_id):
                    return copy
        raise CopyNotFound('no active copy with id or volume id %r' % ident)

    def set_limit(self, ident: str, bps_limit: int) -> ActiveCopy:
        """Change a running copy's rate; the kernel applies it to in-flight I/O at once."""
        if bps_limit <= 0:
            raise ThrottleError('a running copy cannot be made unlimited; use a rate > 0')
        copy = self.find(ident)
        with self._lock:
            limits = plan_limits(copy.src_dev, copy.dst_dev, bps_limit)
            assert self.driver is not None
            self.driver.write_limits(copy.id, limits, previous=copy.limits)
            copy.limits, copy.bps_limit = limits, bps_limit
        LOG.info('copy %s: limit changed to %s', copy.id, format_rate(bps_limit))
        return copy
