"""The throttles under test, each in cgroups of its own, and what they leave behind.

* ours: ``CgroupThrottle`` over a ``CopyManager`` whose parent cgroup is private to this
  run (``cct-bench-<pid>``) and whose registry lives in the run's scratch directory;
* Cinder: ``cinder.volume.throttling.BlkioCgroup`` with oslo.privsep in-process
  (``set_client_mode(False)``), one cgroup per instance (``cct-bench-cinder-<pid>-<n>``)
  that is removed with ``rmdir`` when the instance is retired;
* ours, non-root path: the same, but every cgroup step through this package's privsep
  daemon (executor ``privileged.PRIVSEP``), as in a cinder-volume that is not root; the daemon is
  started once through the real ``cinder-rootwrap`` (over our filters) before any copy
  is timed, as in a running service;
* none: Cinder's base ``Throttle`` (empty prefix): the bare dd baseline.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional

LIMIT_FILES = ('read_bps_device', 'write_bps_device', 'read_iops_device', 'write_iops_device')


def _cinder_cgroup_dir(name: str) -> str:
    # Cinder picks io (v2) when /sys/fs/cgroup/cgroup.controllers exists, else blkio (v1).
    from cinder_cgroup_throttle.cgroups import detect
    host = detect()
    if os.path.isfile('/sys/fs/cgroup/cgroup.controllers'):
        return os.path.join(host.v2_root or '/sys/fs/cgroup', name)
    return os.path.join(host.v1_blkio or '/sys/fs/cgroup/blkio', name)


def _limit_entries(cgdir: str) -> List[str]:
    """Non-empty throttle limits set on a cgroup (v1 files or v2 io.max)."""
    found = []
    for name in ['blkio.throttle.' + f for f in LIMIT_FILES] + ['io.max']:
        with contextlib.suppress(FileNotFoundError):
            with open(os.path.join(cgdir, name)) as f:
                found += ['%s: %s' % (name, line.strip()) for line in f if line.strip()]
    return found


def _pids(cgdir: str) -> List[int]:
    with contextlib.suppress(FileNotFoundError):
        with open(os.path.join(cgdir, 'cgroup.procs')) as f:
            return [int(p) for p in f.read().split()]
    return []


def _rmdir_cgroup(cgdir: str) -> None:
    """Remove a cgroup this run created; its processes are this run's copies: kill them."""
    for _ in range(100):
        try:
            os.rmdir(cgdir)
            return
        except FileNotFoundError:
            return
        except OSError:
            for pid in _pids(cgdir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
    os.rmdir(cgdir)


def _start_privsep(state_dir: str) -> float:
    """Start our privsep daemon through the real cinder-rootwrap; return how long it took."""
    from oslo_privsep import priv_context

    from cinder_cgroup_throttle import privsep
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bindir = os.path.dirname(sys.executable)
    conf = os.path.join(state_dir, 'rootwrap.conf')
    os.makedirs(state_dir, exist_ok=True)
    with open(conf, 'w') as f:
        f.write('[DEFAULT]\nfilters_path=%s\nexec_dirs=%s\nuse_syslog=False\n' % (
            os.path.join(repo, 'etc', 'rootwrap.d'),
            ','.join([bindir, '/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin',
                      '/sbin', '/bin'])))
    priv_context.init(root_helper=[os.path.join(bindir, 'cinder-rootwrap'), conf])
    t0 = time.perf_counter()
    privsep.default.start()
    return time.perf_counter() - t0


class Contenders:
    def __init__(self, limit: int, state_dir: str) -> None:
        import cinder.privsep
        cinder.privsep.sys_admin_pctxt.set_client_mode(False)
        self.limit = limit
        self.state_dir = state_dir
        self.parent = 'cct-bench-%d' % os.getpid()
        self._cinder_dirs: List[str] = []
        self._managers: List[Any] = []
        self.privsep_start_s: Optional[float] = None

    # -- factories ---------------------------------------------------------------------
    def ours(self, backend: str = 'auto', limit: Optional[int] = None,
             executor: Any = None) -> Any:
        from cinder_cgroup_throttle.manager import CopyManager
        from cinder_cgroup_throttle.registry import Registry
        from cinder_cgroup_throttle.throttle import CgroupThrottle
        manager = CopyManager(self.parent, grace=5, backend=backend, executor=executor,
                              registry=Registry(self.state_dir))
        self._managers.append(manager)
        return CgroupThrottle(limit or self.limit, manager=manager)

    def ours_privsep(self) -> Any:
        """Ours with every cgroup step in the privsep daemon (the non-root path)."""
        from cinder_cgroup_throttle import privsep
        from cinder_cgroup_throttle.privileged import PRIVSEP
        if privsep.default.channel is None:
            self.privsep_start_s = _start_privsep(self.state_dir)
        return self.ours(executor=PRIVSEP)

    def cinder(self, limit: Optional[int] = None) -> Any:
        from cinder.volume.throttling import BlkioCgroup
        name = 'cct-bench-cinder-%d-%d' % (os.getpid(), len(self._cinder_dirs))
        self._cinder_dirs.append(_cinder_cgroup_dir(name))
        throttle = BlkioCgroup(limit or self.limit, name)
        throttle.bench_cgroup_dir = self._cinder_dirs[-1]
        return throttle

    @staticmethod
    def none() -> Any:
        from cinder.volume.throttling import Throttle
        return Throttle()

    # -- what is left after copies ended ------------------------------------------------
    def left_behind(self, throttle: Any) -> Dict[str, List[str]]:
        """Cgroups, limits, registry entries and processes a throttle kept after its copies."""
        cgdir = getattr(throttle, 'bench_cgroup_dir', None)
        if cgdir is not None:  # Cinder: one shared cgroup by design; limits should be gone
            return {'limits': _limit_entries(cgdir),
                    'processes': [str(p) for p in _pids(cgdir)]}
        manager = getattr(throttle, 'manager', None)
        if manager is None:
            return {}
        out: Dict[str, List[str]] = {
            'registry': [e.id for e in manager.registry.entries()]}
        if manager.driver is not None:
            leaves = manager.driver.leaves()
            out['cgroups'] = leaves
            out['limits'] = _limit_entries(manager.driver.parent_path)
            out['processes'] = [str(p) for leaf in leaves for p in manager.driver.pids(leaf)]
        return out

    def retire(self, throttle: Any) -> None:
        """Remove a Cinder instance's cgroup (Cinder itself never does)."""
        cgdir = getattr(throttle, 'bench_cgroup_dir', None)
        if cgdir is not None:
            _rmdir_cgroup(cgdir)

    def close(self) -> List[str]:
        """Remove every cgroup this run made; return what had to be cleaned by force."""
        if self.privsep_start_s is not None:
            from cinder_cgroup_throttle import privsep
            privsep.default.stop()  # the daemon exits when its socket closes
        forced = []
        for cgdir in self._cinder_dirs:
            if os.path.isdir(cgdir):
                _rmdir_cgroup(cgdir)
        for manager in self._managers:
            driver = manager.driver
            if driver is None:
                continue
            for leaf in driver.leaves():
                forced.append('cgroup %s' % driver.leaf_path(leaf))
                driver.remove_leaf(leaf, grace=1)
            if os.path.isdir(driver.parent_path):
                _rmdir_cgroup(driver.parent_path)
        return forced
