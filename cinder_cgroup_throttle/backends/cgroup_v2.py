"""cgroup v2: an io leaf per copy (``io.max``; cgroups/io_v2.py)."""
from __future__ import annotations

from cinder_cgroup_throttle.backends.cgroup import CgroupBackend
from cinder_cgroup_throttle.cgroups.io_v2 import IoV2Driver


class CgroupV2Backend(CgroupBackend):
    controller = 'io'
    driver_class = IoV2Driver
    host_mount = 'v2_root'
