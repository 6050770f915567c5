"""cgroup v1: a blkio leaf per copy (``blkio.throttle.*`` files; cgroups/blkio_v1.py)."""
from __future__ import annotations

from cinder_cgroup_throttle.backends.cgroup import CgroupBackend
from cinder_cgroup_throttle.cgroups.blkio_v1 import BlkioV1Driver


class CgroupV1Backend(CgroupBackend):
    controller = 'blkio'
    driver_class = BlkioV1Driver
    host_mount = 'v1_blkio'
