"""The privileged cgroup steps, for a cinder-volume that does not run as root.

cgroupfs is world-readable, but only root may create a cgroup, write its limits or remove
it. Operators run cinder-volume as an unprivileged user and let it do root work through
``sudo cinder-rootwrap /etc/cinder/rootwrap.conf CMD...``, which admits only commands that
match a filter. So when not root, CopyManager wraps its cgroup driver in
:class:`PrivilegedDriver`: reads stay direct, and the three writing steps run as

    cinder-cgroup-throttle-priv create-leaf CONTROLLER PARENT LEAF
    cinder-cgroup-throttle-priv set-limit   CONTROLLER PARENT LEAF MAJ:MIN RBPS WBPS RIOPS WIOPS
    cinder-cgroup-throttle-priv remove-leaf CONTROLLER PARENT LEAF GRACE

through the root helper. The rootwrap filters (etc/rootwrap.d) pin the parent and the leaf
name pattern; :func:`main` validates every argument again and then runs the very driver
code a root cinder-volume runs, so both paths behave alike (one write per limit, rmdir and
never cgdelete, leftover processes killed only from inside the leaf).
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from typing import Iterable, List, Optional, Sequence

from oslo_concurrency import processutils

from cinder_cgroup_throttle import devices
from cinder_cgroup_throttle.cgroups import CgroupDriver, DeviceLimit, get_driver
from cinder_cgroup_throttle.cgroups.base import validate_cgroup_path
from cinder_cgroup_throttle.exception import CgroupOperationError, ThrottleError
from cinder_cgroup_throttle.statefiles import COPY_ID

COMMAND = 'cinder-cgroup-throttle-priv'
DEFAULT_ROOT_HELPER = ['sudo', 'cinder-rootwrap', '/etc/cinder/rootwrap.conf']
MAX_GRACE = 600.0
MAX_COUNT = 2**64 - 1  # the kernel's limits are u64


def default_root_helper() -> List[str]:
    """Cinder's own root helper ('sudo cinder-rootwrap <rootwrap_config>') when Cinder is
    loaded, so a non-default rootwrap.conf is honoured; the packaged default otherwise."""
    if 'cinder.utils' in sys.modules:
        return shlex.split(sys.modules['cinder.utils'].get_root_helper())
    return list(DEFAULT_ROOT_HELPER)


class PrivilegedDriver:
    """A cgroup driver whose writing steps go through the root helper."""

    def __init__(self, driver: CgroupDriver, root_helper: Sequence[str]) -> None:
        self._driver = driver
        self.root_helper = list(root_helper)

    def __getattr__(self, name: str):
        # Reads (leaf_path, leaves, pids, io_bytes, prefix, controller, ...) need no root.
        return getattr(self._driver, name)

    def _run(self, op: str, leaf: str, *args: str) -> str:
        cmd = [COMMAND, op, self._driver.controller, self._driver.parent, leaf] + list(args)
        try:
            # The helper is prepended here, not via run_as_root: processutils drops it for
            # euid 0, and a PrivilegedDriver always means "through the root helper".
            out, _err = processutils.execute(*(self.root_helper + cmd))
        except processutils.ProcessExecutionError as exc:
            raise CgroupOperationError('%s failed (exit %s): %s' % (
                shlex.join(self.root_helper + cmd), exc.exit_code,
                (exc.stderr or exc.stdout or '').strip())) from exc
        return out

    def create_leaf(self, leaf: str) -> str:
        self._run('create-leaf', leaf)
        return self._driver.leaf_path(leaf)

    def write_limits(self, leaf: str, limits: Iterable[DeviceLimit],
                     previous: Iterable[DeviceLimit] = ()) -> None:
        new = {lim.device.majmin: lim for lim in limits}
        for majmin, lim in new.items():
            self._run('set-limit', leaf, majmin, str(lim.rbps), str(lim.wbps),
                      str(lim.riops), str(lim.wiops))
        for lim in previous:
            if lim.device.majmin not in new:
                self._run('set-limit', leaf, lim.device.majmin, '0', '0', '0', '0')

    def remove_leaf(self, leaf: str, grace: float = 10.0) -> List[int]:
        out = self._run('remove-leaf', leaf, '%g' % min(max(grace, 0.0), MAX_GRACE))
        return [int(pid) for pid in out.split()]


def host_driver(parent: str, root_helper: Optional[Sequence[str]] = None) -> CgroupDriver:
    """The host's driver for ``parent``; through the root helper when we are not root."""
    if os.geteuid() == 0:
        return get_driver(parent)
    driver = get_driver(parent, check_writable=False)
    return PrivilegedDriver(driver, root_helper or default_root_helper())  # type: ignore


# -- the root side ----------------------------------------------------------------------
def _count(value: str, what: str) -> int:
    if not re.match(r'^[0-9]{1,20}\Z', value) or int(value) > MAX_COUNT:
        raise ThrottleError('%s must be an integer from 0 to %d, not %.40r'
                            % (what, MAX_COUNT, value))
    return int(value)


def _device(majmin: str) -> devices.BlockDevice:
    # Linux dev_t: 12-bit major, 20-bit minor (os.makedev overflows beyond).
    match = re.match(r'^([0-9]{1,4}):([0-9]{1,7})\Z', majmin)
    if not match or int(match.group(1)) >= 2**12 or int(match.group(2)) >= 2**20:
        raise ThrottleError('device must be MAJ:MIN (major < 4096, minor < 1048576), '
                            'not %.40r' % majmin)
    # Also proves it is a whole disk known to sysfs (a partition maps to another number).
    disk = devices.whole_disk(os.makedev(int(match.group(1)), int(match.group(2))))
    if disk.majmin != majmin:
        raise ThrottleError('%s is a partition; limits go on its disk %s' % (majmin, disk))
    return disk


def run(argv: Sequence[str]) -> str:
    """Validate and perform one operation as root; return what to print."""
    nargs = {'create-leaf': 4, 'set-limit': 9, 'remove-leaf': 5}
    if not argv or argv[0] not in nargs or len(argv) != nargs[argv[0]]:
        raise ThrottleError('usage: %s create-leaf|set-limit|remove-leaf CONTROLLER '
                            'PARENT LEAF [MAJ:MIN RBPS WBPS RIOPS WIOPS | GRACE]' % COMMAND)
    op, controller, parent, leaf = argv[:4]
    if not COPY_ID.match(leaf):
        raise ThrottleError('leaf %r is not a copy id (copy-<pid>-<8 hex digits>)' % leaf)
    driver = get_driver(validate_cgroup_path(parent))
    if controller != driver.controller:
        raise ThrottleError('this host throttles with %s, not %r'
                            % (driver.controller, controller))
    if op == 'create-leaf':
        return driver.create_leaf(leaf)
    if op == 'set-limit':
        if not os.path.isdir(driver.leaf_path(leaf)):
            raise ThrottleError('no cgroup %s' % driver.leaf_path(leaf))
        dev = _device(argv[4])
        rbps, wbps, riops, wiops = (_count(v, k) for v, k in zip(
            argv[5:], ('rbps', 'wbps', 'riops', 'wiops')))
        # Every key is written, so the result never depends on what the leaf held.
        driver.write_limits(leaf, [DeviceLimit(dev, rbps, wbps, riops, wiops)],
                            previous=[DeviceLimit(dev, 1, 1, 1, 1)])
        return ''
    try:
        grace = float(argv[4]) if re.match(r'^[0-9]+(\.[0-9]+)?\Z', argv[4]) else -1.0
    except (ValueError, OverflowError):
        grace = -1.0
    if not 0 <= grace <= MAX_GRACE:
        raise ThrottleError('grace must be seconds within 0..%g, not %.40r'
                            % (MAX_GRACE, argv[4]))
    return ' '.join(str(pid) for pid in driver.remove_leaf(leaf, grace))


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        out = run(sys.argv[1:] if argv is None else argv)
    except ThrottleError as exc:
        sys.stderr.write('%s: %s\n' % (COMMAND, exc))
        return 1
    if out:
        print(out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
