"""Which device and direction a copy's bandwidth limit goes on.

One rule, because a single dd alternates reads and writes: with a read limit on the source
*and* a write limit on the destination, each at the full rate, every block waits out both
budgets once a block takes longer than blk-throttle's slice, and the copy crawls at
0.5-0.86 of the rate (Cinder's BlkioCgroup). So a copy gets its rate in ONE direction:

* the destination's writes when the destination resolves to a block device. Cinder writes
  with O_DIRECT wherever the target supports it (``oflag=direct``, ``qemu-img -t none``),
  which v1 charges exactly; it is also the only side that works for a page-cached source
  (qemu-img reading a just-downloaded image) and for ``/dev/zero`` wipes;
* otherwise the source's reads (reads are charged buffered or not: readahead counts).

Reads then run at the write rate by back-pressure, so the source device sees no more than
the rate either, except for zero blocks that ``conv=sparse`` skips writing.
"""
from __future__ import annotations

from typing import List, Optional

from cinder_cgroup_throttle.cgroups.base import DeviceLimit
from cinder_cgroup_throttle.devices import BlockDevice


def plan_limits(src: Optional[BlockDevice], dst: Optional[BlockDevice],
                bps: int) -> List[DeviceLimit]:
    """Limits that make a copy from ``src`` to ``dst`` move ``bps`` bytes/s."""
    if not bps:
        return []
    if dst is not None:
        return [DeviceLimit(dst, wbps=bps)]
    if src is not None:
        return [DeviceLimit(src, rbps=bps)]
    return []
