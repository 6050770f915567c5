"""Per-copy cgroup I/O throttling for Cinder's host-based volume copies."""
from typing import Any

__all__ = ['CgroupThrottle']


def __getattr__(name: str) -> Any:
    # Lazy: importing the throttle imports Cinder (~0.7 s); the CLI does not need it.
    if name == 'CgroupThrottle':
        from cinder_cgroup_throttle.throttle import CgroupThrottle
        return CgroupThrottle
    raise AttributeError(name)
