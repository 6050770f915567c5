"""The Cinder-facing throttle: ``cinder.volume.throttling.Throttle`` backed by CopyManager.

Cinder calls ``subcommand(src, dst)`` around every host-based copy and prepends the yielded
``prefix`` to the dd or qemu-img argv. When Cinder is importable this class subclasses its
``Throttle``, so ``Throttle.set_default(t)``/``get_default()`` work as Cinder uses them;
without Cinder (CLI, standalone use) a compatible base is used.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional

from cinder_cgroup_throttle.manager import DEFAULT_CGROUP, CopyManager
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
    """Per-copy cgroup throttle; ``bps_limit`` 0 means copies run unthrottled."""

    def __init__(self, bps_limit: Any, cgroup_name: str = DEFAULT_CGROUP,
                 grace: float = 10.0, manager: Optional[CopyManager] = None) -> None:
        super().__init__()
        self.bps_limit = parse_rate(bps_limit, 'bps_limit')
        self.manager = manager or CopyManager(cgroup_name, grace=grace)

    @contextlib.contextmanager
    def subcommand(self, srcpath: str, dstpath: str) -> Iterator[Dict[str, Any]]:
        if not self.bps_limit:
            yield {'prefix': []}
            return
        with self.manager.copy(srcpath, dstpath, self.bps_limit) as copy:
            yield {'prefix': list(copy.prefix)}

    def set_limit(self, ident: str, bps_limit: Any) -> None:
        """Re-limit a running copy by copy id or volume id."""
        self.manager.set_limit(ident, parse_rate(bps_limit, 'bps_limit'))
