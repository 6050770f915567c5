"""The Cinder-facing throttle: ``cinder.volume.throttling.Throttle`` backed by CopyManager.

Cinder calls ``subcommand(src, dst)`` around every host-based copy and prepends the yielded
``prefix`` to the dd or qemu-img argv. When Cinder is importable this class subclasses its
``Throttle``, so ``Throttle.set_default(t)``/``get_default()`` work as Cinder uses them;
without Cinder (CLI, standalone use) a compatible base is used.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional

from cinder_cgroup_throttle import backends
from cinder_cgroup_throttle.budget import BudgetConfig
from cinder_cgroup_throttle.exception import InvalidRate, ThrottleError
from cinder_cgroup_throttle.manager import DEFAULT_CGROUP, CopyManager
from cinder_cgroup_throttle.registry import Registry
from cinder_cgroup_throttle.sharing import StaticLimits
from cinder_cgroup_throttle.units import parse_rate

try:
    from cinder.volume.throttling import Throttle as _Throttle
except ImportError:  # standalone use
    class _Throttle:  # type: ignore[no-redef]
        """Same contract as cinder.volume.throttling.Throttle."""

        DEFAULT: Optional['_Throttle'] = None

        @staticmethod
        def set_default(throttle: '_Throttle') -> None:
            _Throttle.DEFAULT = throttle

        @staticmethod
        def get_default() -> '_Throttle':
            return _Throttle.DEFAULT or _Throttle()

        def __init__(self, prefix: Optional[list] = None) -> None:
            self.prefix = prefix or []

        @contextlib.contextmanager
        def subcommand(self, srcpath: str, dstpath: str) -> Iterator[Dict[str, Any]]:
            yield {'prefix': self.prefix}


class CgroupThrottle(_Throttle):
    """Per-copy cgroup throttle, configured like the CLI and the cinder.conf options.

    ``bps_limit``: each copy's rate (``volume_copy_bps_limit``; bytes/s or units such as
    ``'8Mi'``; 0 = no own rate). ``backend``: one of ``backends.CHOICES``, default 'auto'
    (``volume_copy_throttle_backend``). ``host_bps_limit``: total of all concurrent copies
    of this throttle, shared fairly (``volume_copy_host_bps_limit``).
    ``read_bps_limit``/``write_bps_limit``/``read_iops_limit``/``write_iops_limit``: static
    per-direction limits on every copy (``volume_copy_read_bps_limit`` ...).
    ``allow_unthrottled``: run a copy nothing can throttle instead of failing it.
    ``budget_config``: a budget shared with the backend's other hosts
    (``volume_copy_backend_bps_limit`` and ``[copy_budget]``; budget.py).
    ``state_dir``: registry of active copies that ``status``/``set-limit`` read (default
    ``$CINDER_CGROUP_THROTTLE_STATE_DIR`` or ``/run/cinder-cgroup-throttle``).
    ``manager``: a ready CopyManager instead (the keyword arguments above then must not be
    given). With no rate, no host cap and no static limit, copies run unthrottled.
    """

    def __init__(self, bps_limit: Any = 0, cgroup_name: str = DEFAULT_CGROUP,
                 grace: float = 10.0, manager: Optional[CopyManager] = None, *,
                 backend: Optional[str] = None, host_bps_limit: Any = 0, read_bps_limit: Any = 0,
                 write_bps_limit: Any = 0, read_iops_limit: int = 0,
                 write_iops_limit: int = 0, allow_unthrottled: bool = False,
                 state_dir: Optional[str] = None,
                 budget_config: Optional[BudgetConfig] = None) -> None:
        super().__init__()
        self.bps_limit = parse_rate(bps_limit, 'bps_limit')
        static = StaticLimits(read_bps=parse_rate(read_bps_limit, 'read_bps_limit'),
                              write_bps=parse_rate(write_bps_limit, 'write_bps_limit'),
                              read_iops=_count(read_iops_limit, 'read_iops_limit'),
                              write_iops=_count(write_iops_limit, 'write_iops_limit'))
        host_bps = parse_rate(host_bps_limit, 'host_bps_limit')
        if manager is not None:
            if (backend is not None or host_bps or static or allow_unthrottled
                    or state_dir is not None or budget_config is not None):
                raise ThrottleError('CgroupThrottle: give either manager or the manager\'s '
                                    'settings (backend, limits, state_dir, budget_config), '
                                    'not both')
        else:
            manager = CopyManager(cgroup_name, grace=grace, backend=backend or backends.AUTO,
                                  allow_unthrottled=allow_unthrottled,
                                  registry=Registry(state_dir), host_bps_limit=host_bps,
                                  static=static, budget_config=budget_config)
        self.manager = manager

    def _throttled(self, bps: int) -> bool:
        return bool(bps or self.manager.host_bps_limit or self.manager.static
                    or self.manager.budget)

    @contextlib.contextmanager
    def subcommand(self, srcpath: str, dstpath: str) -> Iterator[Dict[str, Any]]:
        if not self._throttled(self.bps_limit):
            yield {'prefix': []}
            return
        with self.manager.copy(srcpath, dstpath, self.bps_limit) as copy:
            yield {'prefix': list(copy.prefix)}

    def set_limit(self, ident: str, bps_limit: Any) -> None:
        """Re-limit a running copy by copy id or volume id."""
        self.manager.set_limit(ident, parse_rate(bps_limit, 'bps_limit'))


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRate('%s must be a whole number >= 0, not %r' % (what, value))
    return value
