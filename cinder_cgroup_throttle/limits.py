"""Which device and direction a copy's bandwidth limit goes on.

One rule, because a single dd alternates reads and writes: with a read limit on the source
*and* a write limit on the destination, each at the full rate, every block waits out both
budgets once a block takes longer than blk-throttle's slice, and the copy crawls at
0.5-0.86 of the rate (Cinder's BlkioCgroup). So a copy gets its rate in ONE direction, on
the side whose I/O the kernel is sure to charge to the copy's cgroup:

1. the destination's writes when the destination is itself a block device: Cinder writes
   to block devices with O_DIRECT (``oflag=direct``, ``qemu-img -t none``), which is
   charged exactly; it is also the only side that works for a page-cached source (qemu-img
   reading a just-downloaded image) and for ``/dev/zero`` wipes;
2. else the source's reads when the source is on a block device: a *file* destination may
   be written through the page cache (``convert_image`` only uses ``-t none`` for block
   devices), and v1 does not charge writeback to the writer, while reads are charged
   buffered or not (readahead counts);
3. else the writes of the destination file's filesystem (v2 charges writeback when the
   memory controller is on; v1 charges direct and fsync-issued writes).

Reads then run at the write rate (or writes at the read rate) by back-pressure, so the
other device sees no more than the rate either, except for zero blocks that
``conv=sparse`` skips writing.
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
    if dst is not None and not dst.via_file:
        return [DeviceLimit(dst, wbps=bps)]
    if src is not None:
        return [DeviceLimit(src, rbps=bps)]
    if dst is not None:
        return [DeviceLimit(dst, wbps=bps)]
    return []
