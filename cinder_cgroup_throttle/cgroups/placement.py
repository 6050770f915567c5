"""Where the per-copy cgroups go, decided by who owns the cgroup tree here.

On a v2 host systemd owns the tree: a service may only create cgroups below its own unit,
and only when the unit is delegated (``Delegate=``); systemd marks such a unit's cgroup
with the ``trusted.delegate``/``user.delegate`` xattr ("Control Group APIs and
Delegation", systemd.io). A container with a private cgroup namespace owns the subtree it
sees as ``/``. In both, v2's no-internal-process rule applies: the cgroup that holds the
service's processes cannot pass controllers on to children. So, like a container init,
the service's processes first move into a leaf of their own (``<home>/main``) and the
copies' leaves go to ``<home>/<name>/``. Copies then live inside the service: systemd
accounts them, kills them with ``systemctl stop`` and removes their cgroups with the
unit's, and nothing is written outside the subtree handed over.

The cases (:attr:`Placement.case`), as ``cinder-cgroup-throttle check`` reports them:

* ``v1``: a v1 blkio hierarchy; no internal-process rule there: ``<name>`` at its top;
* ``v2-delegated``: a systemd unit with ``Delegate=``: ``<unit>/<name>``;
* ``v2-cgroupns``: the root of a private cgroup namespace (a container): ``/<name>`` in
  the namespace, after the processes moved to ``/main``;
* ``v2-not-delegated``: v2 without either (no systemd, or a unit that is not delegated):
  ``<name>`` at the top of the hierarchy, as before;
* ``read-only``: cgroupfs mounted read-only (an unprivileged container): no cgroup backend,
  copies use the pv fallback;
* ``none``: no usable cgroup hierarchy.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
from typing import List, Optional

from cinder_cgroup_throttle.cgroups import CgroupHost, detect
from cinder_cgroup_throttle.cgroups.base import read_file, validate_cgroup_path
from cinder_cgroup_throttle.exception import CgroupUnavailable

LOG = logging.getLogger(__name__)

MAIN_LEAF = 'main'  # where the service's own processes go in a delegated subtree
DELEGATE_XATTRS = ('trusted.delegate', 'user.delegate')
_MOVE_ROUNDS = 20


@dataclasses.dataclass(frozen=True)
class Placement:
    case: str
    parent: str  # parent cgroup of the copies' leaves, relative to the mount
    reason: str
    mountpoint: Optional[str] = None
    home: Optional[str] = None  # its processes move into <home>/main first ('' = root)

    def __str__(self) -> str:
        return '%s: %s' % (self.case, self.reason)


def own_cgroup(pid: str = 'self') -> Optional[str]:
    """The v2 cgroup of a process, as its cgroup namespace shows it ('/a/b')."""
    for line in (read_file('/proc/%s/cgroup' % pid) or '').splitlines():
        if line.startswith('0::'):
            return line[3:]
    return None


def delegated(path: str) -> bool:
    """True when systemd handed this cgroup's subtree to its unit (Delegate=)."""
    for name in DELEGATE_XATTRS:
        try:
            if os.getxattr(path, name) == b'1':
                return True
        except OSError:  # ENODATA, or EPERM for trusted.* when not root
            continue
    return False


def resolve(name: str, host: Optional[CgroupHost] = None,
            cgroup: Optional[str] = None) -> Placement:
    """The placement for a process in ``cgroup`` (default: this process's)."""
    name = validate_cgroup_path(name)
    host = host or detect()
    if host.v1_blkio:
        if host.v1_blkio_readonly:
            return Placement('read-only', name, 'the v1 blkio hierarchy at %s is mounted '
                             'read-only (an unprivileged container?)' % host.v1_blkio)
        return Placement('v1', name, 'cgroup v1 blkio at %s: leaves under /%s'
                         % (host.v1_blkio, name), host.v1_blkio)
    if not host.v2_root:
        return Placement('none', name, 'no cgroup filesystem is mounted')
    if host.v2_readonly:
        return Placement('read-only', name, 'cgroup2 at %s is mounted read-only (an '
                         'unprivileged container?)' % host.v2_root)
    top = Placement('v2-not-delegated', name, 'cgroup v2, not in a delegated systemd unit '
                    'nor in a private cgroup namespace: leaves under /%s' % name, host.v2_root)
    own = own_cgroup() if cgroup is None else cgroup
    root = host.v2_mount_root.rstrip('/')
    if own is None or not (own + '/').startswith(root + '/'):
        return top  # our cgroup is not under this mount (another namespace's view)
    rel = own[len(root):].strip('/')
    homes = [rel] + ([os.path.dirname(rel)] if os.path.basename(rel) == MAIN_LEAF else [])
    for home in homes:
        path = os.path.join(host.v2_root, home)
        parent = '%s/%s' % (home, name) if home else name
        if home and delegated(path):
            return Placement('v2-delegated', parent, 'cgroup v2, systemd unit cgroup /%s '
                             'is delegated: the service runs in /%s/%s, copies under /%s'
                             % (home, home, MAIN_LEAF, parent), host.v2_root, home)
        if not home and os.path.exists(os.path.join(path, 'cgroup.type')):
            # Only a non-root cgroup has cgroup.type: this '/' is a namespace's root.
            return Placement('v2-cgroupns', parent, 'cgroup v2, private cgroup namespace '
                             '(a container): its processes run in /%s, copies under /%s'
                             % (MAIN_LEAF, parent), host.v2_root, home)
    return top


def _pids(path: str) -> List[str]:
    return (read_file(os.path.join(path, 'cgroup.procs')) or '').split()


def adopt(placement: Placement) -> None:
    """Move every process of the placement's home cgroup into ``<home>/main``, so that the
    home may enable controllers for the copies' leaves (v2: no internal processes).

    Processes forked meanwhile are born in the home and moved by the next round.
    """
    if placement.home is None or placement.mountpoint is None:
        return
    home = os.path.join(placement.mountpoint, placement.home)
    main = os.path.join(home, MAIN_LEAF)
    try:
        try:
            os.mkdir(main)
        except FileExistsError:
            pass
        for _round in range(_MOVE_ROUNDS):
            pids = _pids(home)
            if not pids:
                return
            for pid in pids:
                try:
                    with open(os.path.join(main, 'cgroup.procs'), 'w') as f:
                        f.write(pid)
                except ProcessLookupError:
                    pass  # exited meanwhile
        raise OSError(errno.EBUSY, 'processes keep appearing in it: %s'
                      % ' '.join(_pids(home)[:5]))
    except OSError as exc:
        raise CgroupUnavailable(
            '%s; cgroup v2 lets only a cgroup without processes enable controllers for '
            'child cgroups, so the processes of %s must move to %s first, which failed: %s'
            % (placement, home, main, exc.strerror or exc)) from exc


def place(name: str) -> str:
    """Resolve this process's placement, move its processes where needed and return the
    parent cgroup for copy leaves; CgroupUnavailable says why cgroups cannot be used."""
    placement = resolve(name)
    if placement.case in ('read-only', 'none'):
        raise CgroupUnavailable(placement.reason)
    adopt(placement)
    LOG.info('per-copy cgroups: %s', placement)
    return placement.parent


#: The unit names of cinder-volume in Debian/Ubuntu and RHEL packages.
SERVICE_UNITS = ('cinder-volume.service', 'openstack-cinder-volume.service')


def describe(name: str, host: Optional[CgroupHost] = None) -> List[str]:
    """What ``check`` says: the case for this process, and for a running cinder-volume
    unit (check itself runs in the operator's session, not in the service)."""
    host = host or detect()
    here = resolve(name, host)
    lines = ['this process: %s' % here]
    if here.case == 'v2-cgroupns':
        lines.append('processes in the namespace root /: %s (moved to /%s at start)' % (
            ' '.join(_pids(host.v2_root or '/')[:8]) or 'none', MAIN_LEAF))
    if host.v2_root and here.case == 'v2-not-delegated':
        for unit in SERVICE_UNITS:
            cgroup = '/system.slice/' + unit
            if os.path.isdir(os.path.join(host.v2_root, cgroup.lstrip('/'))):
                lines.append('%s (running): %s' % (unit, resolve(name, host, cgroup)))
    return lines
