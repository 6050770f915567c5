"""From rates to device limits, and a host-wide cap shared fairly between copies.

Pure functions without oslo or Cinder imports: the owning process and the CLI (another
process re-limiting a copy) must compute exactly the same limits.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from cinder_cgroup_throttle.cgroups.base import DeviceLimit
from cinder_cgroup_throttle.devices import BlockDevice
from cinder_cgroup_throttle.limits import plan_limits


@dataclasses.dataclass(frozen=True)
class StaticLimits:
    """Per-direction limits a copy gets besides its rate (0 = none); never re-balanced."""

    read_bps: int = 0
    write_bps: int = 0
    read_iops: int = 0
    write_iops: int = 0

    def __bool__(self) -> bool:
        return any(dataclasses.astuple(self))


def device_limits(src: Optional[BlockDevice], dst: Optional[BlockDevice], bps: int,
                  static: StaticLimits = StaticLimits()) -> List[DeviceLimit]:
    """The copy's rate in one direction (limits.py) plus the static per-direction limits;
    where both limit the same key of the same device, the lower one."""
    wanted: List[Tuple[Optional[BlockDevice], str, int]] = [
        (src, 'rbps', static.read_bps), (src, 'riops', static.read_iops),
        (dst, 'wbps', static.write_bps), (dst, 'wiops', static.write_iops)]
    merged = {lim.device: {f.name: getattr(lim, f.name) for f in dataclasses.fields(lim)}
              for lim in plan_limits(src, dst, bps)}
    for device, key, value in wanted:
        if device is None or not value:
            continue
        fields = merged.setdefault(device, {'device': device})
        fields[key] = min(fields.get(key) or value, value)
    return [DeviceLimit(**fields) for fields in merged.values()]


def pipe_rate(bps: int, limits: List[DeviceLimit]) -> int:
    """The one rate a pv pipeline enforces for a copy: the lowest bytes/s among its rate
    and the device limits that apply to it (0: none, only IOPS limits, which pv cannot
    express)."""
    rates = [r for lim in limits for r in (lim.rbps, lim.wbps) if r] + ([bps] if bps else [])
    return min(rates, default=0)


def fair_shares(requested: Dict[str, int], cap: int) -> Dict[str, int]:
    """Each copy's rate under a total ``cap`` (0 = no cap): max-min fairness.

    A copy never gets more than it asked for (0 = "no own limit"); what copies with a
    low own limit leave unused is split among the others, so the rates add up to the cap
    whenever the copies could use it, and no copy waits for another to finish.
    """
    if not cap:
        return dict(requested)
    shares: Dict[str, int] = {}
    left = cap
    order = sorted(requested, key=lambda ident: (requested[ident] or cap + 1, ident))
    for n, ident in enumerate(order):
        fair = max(1, left // (len(order) - n))
        own = requested[ident]
        shares[ident] = min(own, fair) if own else fair
        left = max(0, left - shares[ident])
    return shares
