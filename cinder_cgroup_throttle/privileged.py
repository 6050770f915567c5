"""Privileged operations in one place: the executor, and the root side of a non-root service.

:func:`executor` decides once, from the effective uid, how root's steps run; the chosen
:class:`Executor` is injected wherever root is needed (manager, backends, re-limit,
cleanup, CLI).

cgroupfs is world-readable, but only root may create a cgroup, write its limits or remove
it. As os-brick and Cinder do, those steps run in an oslo.privsep daemon: the context
``privsep.default`` (module ``privsep``), started once per process with

    sudo cinder-rootwrap /etc/cinder/rootwrap.conf privsep-helper [--config-file F]...
        --privsep_context cinder_cgroup_throttle.privsep.default --privsep_sock_path S

(the root helper Cinder passes to ``priv_context.init``; ``sudo cinder-rootwrap
/etc/cinder/rootwrap.conf`` when nothing did). The daemon keeps uid 0 and one capability,
**CAP_DAC_OVERRIDE** [measured]: cgroupfs files and cgroups below the root belong to root
and its mode bits allow their owner every write, mkdir and rmdir, but the hierarchy's root
directory is mode 0555, so creating the parent cgroup there needs it (as does a subtree
delegated to another owner). Leftover processes in a leaf are root's own (dd and qemu-img
run through sudo), so killing them needs no CAP_KILL; nothing needs CAP_SYS_ADMIN.

Whether we are root is decided once, by :func:`executor`: :data:`ROOT` writes cgroupfs
directly, :data:`PRIVSEP` wraps every cgroup driver in :class:`PrivilegedDriver`: reads stay
direct; create-leaf (with its limits: one call per copy start), write-limits and one
removal attempt per call go to the daemon, which validates every argument again and runs
the very driver code a root cinder-volume runs (one write per limit, rmdir and never
cgdelete, leftover processes killed only from inside the leaf). The daemon keeps its
drivers for the life of the service, so the parent cgroup is removed with its last leaf
exactly when the daemon created it. Waiting for a busy leaf happens on the caller's side
(green under eventlet); each call into root has a deadline (``privsep.CALL_TIMEOUT``,
``privsep.START_TIMEOUT``) and fails with PrivilegedTimeout or PrivilegedHelperError,
never by hanging.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from types import ModuleType
from typing import Any, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple

from cinder_cgroup_throttle import devices
from cinder_cgroup_throttle.cgroups import CgroupDriver, DeviceLimit, get_driver
from cinder_cgroup_throttle.cgroups.base import validate_cgroup_path
from cinder_cgroup_throttle.exception import ThrottleError
from cinder_cgroup_throttle.statefiles import COPY_ID

DEFAULT_ROOT_HELPER = ['sudo', 'cinder-rootwrap', '/etc/cinder/rootwrap.conf']
PIPE_COMMAND = 'cinder-cgroup-throttle-pipe'  # the pv fallback's wrapper (pipeline.py)
MAX_LIMITS = 16  # devices per write_limits call (a copy has at most two)
MAX_COUNT = 2**64 - 1  # the kernel's limits are u64
_KEYS = ('rbps', 'wbps', 'riops', 'wiops')


def default_root_helper() -> List[str]:
    """Cinder's own root helper ('sudo cinder-rootwrap <rootwrap_config>') when Cinder is
    loaded, so a non-default rootwrap.conf is honoured; the packaged default otherwise."""
    if 'cinder.utils' in sys.modules:
        return shlex.split(sys.modules['cinder.utils'].get_root_helper())
    return list(DEFAULT_ROOT_HELPER)


def _privsep() -> ModuleType:
    from cinder_cgroup_throttle import privsep  # noqa: F811  (lazy: see privsep's doc)
    return privsep


def _rows(limits: Iterable[DeviceLimit]) -> List[List[str]]:
    """Limits as strings, as on a command line: the daemon validates them as such."""
    return [[lim.device.majmin] + [str(getattr(lim, k)) for k in _KEYS] for lim in limits]


class PrivilegedDriver:
    """A cgroup driver whose writing steps run in the privsep daemon."""

    def __init__(self, driver: CgroupDriver) -> None:
        self._driver = driver

    def __getattr__(self, name: str) -> Any:
        # Reads (leaf_path, leaves, pids, io_bytes, prefix, controller, ...) need no root.
        return getattr(self._driver, name)

    def _args(self, leaf: str) -> Tuple[str, str, str]:
        return self._driver.controller, self._driver.parent, leaf

    def create_leaf(self, leaf: str, limits: Iterable[DeviceLimit] = ()) -> str:
        return _privsep().create_leaf(*self._args(leaf), _rows(limits))

    def write_limits(self, leaf: str, limits: Iterable[DeviceLimit],
                     previous: Iterable[DeviceLimit] = ()) -> None:
        _privsep().write_limits(*self._args(leaf), _rows(limits), _rows(previous))

    def try_remove_leaf(self, leaf: str, kill: bool = False) -> Tuple[bool, List[int]]:
        gone, killed = _privsep().try_remove_leaf(*self._args(leaf), kill)
        return bool(gone), [int(pid) for pid in killed]

    def remove_leaf(self, leaf: str, grace: float = 10.0) -> List[int]:
        return CgroupDriver.remove_leaf(self, leaf, grace)  # type: ignore[arg-type]


# -- the executor: how this process performs root's steps, decided once -----------------
class Executor(Protocol):
    """How root's steps run for this process: the cgroup writes, and the name under which
    Cinder runs the pv fallback's wrapper. Injected everywhere, so tests and the non-root
    path run the same code with the executor they name."""

    name: str

    def driver(self, parent: str) -> CgroupDriver:
        """The host's cgroup driver for ``parent``, writing the way this executor can."""

    def wrap(self, driver: CgroupDriver) -> CgroupDriver:
        """A driver rebuilt from a registry entry, writing the way this executor can."""

    def pipe_command(self) -> Optional[str]:
        """argv[0] of the pv fallback's wrapper; None when it is not installed."""

    def how(self) -> str:
        """How root's steps run, for ``check``."""


def _pipe_beside() -> Optional[str]:
    """The wrapper installed beside this interpreter (a venv whose bin is not on PATH)."""
    beside = os.path.join(os.path.dirname(sys.executable), PIPE_COMMAND)
    return beside if os.access(beside, os.X_OK) else None


class RootExecutor:
    """We are root: drivers write cgroupfs directly."""

    name = 'root'

    def driver(self, parent: str) -> CgroupDriver:
        return get_driver(parent)

    def wrap(self, driver: CgroupDriver) -> CgroupDriver:
        return driver

    def pipe_command(self) -> Optional[str]:
        # By name when PATH finds it, else by its path (nothing matches names for root).
        return PIPE_COMMAND if shutil.which(PIPE_COMMAND) else _pipe_beside()

    def how(self) -> str:
        return 'directly as root'


class PrivsepExecutor:
    """Not root: cgroup writes go to the privsep daemon (reads stay direct)."""

    name = 'privsep'

    def driver(self, parent: str) -> CgroupDriver:
        return self.wrap(get_driver(parent, check_writable=False))

    def wrap(self, driver: CgroupDriver) -> CgroupDriver:
        return PrivilegedDriver(driver)  # type: ignore[return-value]

    def pipe_command(self) -> Optional[str]:
        # By name: rootwrap's filters match the name, and its exec_dirs find it.
        return PIPE_COMMAND if shutil.which(PIPE_COMMAND) or _pipe_beside() else None

    def how(self) -> str:
        return 'through ' + ' '.join(_privsep().default.helper_command('SOCKET')[:-4])


ROOT = RootExecutor()
PRIVSEP = PrivsepExecutor()


def executor() -> Executor:
    """This process's executor: the one place that asks whether we are root."""
    return ROOT if os.geteuid() == 0 else PRIVSEP


# -- the root side: runs in the privsep daemon (privsep.py's entrypoints) ---------------
_DRIVERS: Dict[str, CgroupDriver] = {}  # per parent, for the daemon's life (owns_parent)


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


def _strings(*values: Any) -> None:
    if not all(isinstance(v, str) for v in values):
        raise ThrottleError('arguments must be strings, not %r' % (values,))


def _leaf_driver(controller: str, parent: str, leaf: str) -> CgroupDriver:
    _strings(controller, parent, leaf)
    if not COPY_ID.match(leaf):
        raise ThrottleError('leaf %r is not a copy id (copy-<pid>-<8 hex digits>)' % leaf)
    parent = validate_cgroup_path(parent)
    driver = _DRIVERS.get(parent)
    if driver is None:
        driver = _DRIVERS.setdefault(parent, get_driver(parent))
    if controller != driver.controller:
        raise ThrottleError('this host throttles with %s, not %r'
                            % (driver.controller, controller))
    return driver


def _limits(rows: Any) -> List[DeviceLimit]:
    if not isinstance(rows, (list, tuple)) or len(rows) > MAX_LIMITS:
        raise ThrottleError('limits must be a list of at most %d rows' % MAX_LIMITS)
    out = []
    for row in rows:
        if not isinstance(row, (list, tuple)) or len(row) != 1 + len(_KEYS):
            raise ThrottleError('a limit is [MAJ:MIN, RBPS, WBPS, RIOPS, WIOPS], not %r'
                                % (row,))
        _strings(*row)
        out.append(DeviceLimit(_device(row[0]), *(
            _count(value, key) for value, key in zip(row[1:], _KEYS))))
    return out


def create_leaf(controller: str, parent: str, leaf: str,
                limits: Sequence[Sequence[str]]) -> str:
    driver = _leaf_driver(controller, parent, leaf)
    return driver.create_leaf(leaf, _limits(limits))  # checked before anything is made


def write_limits(controller: str, parent: str, leaf: str, limits: Sequence[Sequence[str]],
                 previous: Sequence[Sequence[str]]) -> None:
    driver = _leaf_driver(controller, parent, leaf)
    if not os.path.isdir(driver.leaf_path(leaf)):
        raise ThrottleError('no cgroup %s' % driver.leaf_path(leaf))
    driver.write_limits(leaf, _limits(limits), _limits(previous))


def try_remove_leaf(controller: str, parent: str, leaf: str,
                    kill: bool) -> Tuple[bool, List[int]]:
    if not isinstance(kill, bool):
        raise ThrottleError('kill must be true or false, not %r' % (kill,))
    return _leaf_driver(controller, parent, leaf).try_remove_leaf(leaf, kill)
