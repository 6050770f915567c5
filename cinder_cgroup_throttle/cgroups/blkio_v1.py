"""cgroup v1 blkio driver: ``blkio.throttle.{read,write}_{bps,iops}_device`` on the leaf."""
from __future__ import annotations

import os
from typing import Dict, Iterable, Tuple

from cinder_cgroup_throttle.cgroups.base import CgroupDriver, DeviceLimit, read_file
from cinder_cgroup_throttle.exception import CgroupOperationError

_FILES = (('rbps', 'blkio.throttle.read_bps_device'),
          ('wbps', 'blkio.throttle.write_bps_device'),
          ('riops', 'blkio.throttle.read_iops_device'),
          ('wiops', 'blkio.throttle.write_iops_device'))


class BlkioV1Driver(CgroupDriver):
    controller = 'blkio'

    def ensure_parent(self) -> bool:
        if os.path.isdir(self.parent_path):
            return False
        try:
            os.makedirs(self.parent_path, exist_ok=True)
        except OSError as exc:
            raise CgroupOperationError(
                'cannot create cgroup %s: %s' % (self.parent_path, exc)) from exc
        return True

    def write_limits(self, leaf: str, limits: Iterable[DeviceLimit],
                     previous: Iterable[DeviceLimit] = ()) -> None:
        path = self.leaf_path(leaf)
        new = {lim.device.majmin: lim for lim in limits}
        old = {lim.device.majmin: lim for lim in previous}
        for key, name in _FILES:
            for majmin, lim in new.items():
                value = getattr(lim, key)
                before = getattr(old[majmin], key) if majmin in old else 0
                if value or before:
                    # Plain integers only: v1 silently truncates suffixes ("4M" -> 4 B/s).
                    self._write(os.path.join(path, name), '%s %d' % (majmin, value))
            for majmin, lim in old.items():
                if majmin not in new and getattr(lim, key):
                    self._write(os.path.join(path, name), '%s 0' % majmin)

    def io_bytes(self, leaf: str) -> Dict[str, Tuple[int, int]]:
        text = read_file(os.path.join(self.leaf_path(leaf),
                                      'blkio.throttle.io_service_bytes')) or ''
        out: Dict[str, Tuple[int, int]] = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) != 3 or parts[1] not in ('Read', 'Write'):
                continue
            read, written = out.get(parts[0], (0, 0))
            if parts[1] == 'Read':
                read = int(parts[2])
            else:
                written = int(parts[2])
            out[parts[0]] = (read, written)
        return out
