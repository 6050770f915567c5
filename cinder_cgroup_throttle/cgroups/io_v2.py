"""cgroup v2 io driver: one ``io.max`` line per device on the leaf.

v2 is hierarchical: ``+io`` has to be enabled in ``cgroup.subtree_control`` of every
ancestor, and a cgroup that holds processes cannot enable controllers for its children
(the parent therefore never gets any). ``+memory`` is enabled alongside when available so
that page-cache writeback is charged to the copy's cgroup and throttled too.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Tuple

from cinder_cgroup_throttle.cgroups.base import CgroupDriver, DeviceLimit, read_file
from cinder_cgroup_throttle.exception import CgroupOperationError


class IoV2Driver(CgroupDriver):
    controller = 'io'

    def _controllers_to_enable(self) -> List[str]:
        available = (read_file(os.path.join(self.mountpoint, 'cgroup.controllers')) or '')
        return [c for c in ('io', 'memory') if c in available.split()]

    def ensure_parent(self) -> None:
        wanted = self._controllers_to_enable()
        level = self.mountpoint
        for segment in [''] + self.parent.split('/'):
            level = os.path.join(level, segment) if segment else level
            if segment:
                try:
                    os.mkdir(level)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise CgroupOperationError(
                        'cannot create cgroup %s: %s' % (level, exc)) from exc
            control = os.path.join(level, 'cgroup.subtree_control')
            enabled = (read_file(control) or '').split()
            for controller in wanted:
                if controller not in enabled:
                    self._write(control, '+' + controller)

    def write_limits(self, leaf: str, limits: Iterable[DeviceLimit],
                     previous: Iterable[DeviceLimit] = ()) -> None:
        path = os.path.join(self.leaf_path(leaf), 'io.max')
        new = {lim.device.majmin: lim for lim in limits}
        for majmin, lim in new.items():
            # io.max rejects 0; "max" is v2's "unlimited".
            fields = ['%s=%s' % (key, getattr(lim, key) or 'max')
                      for key in ('rbps', 'wbps', 'riops', 'wiops')]
            self._write(path, '%s %s' % (majmin, ' '.join(fields)))
        for lim in previous:
            if lim.device.majmin not in new:
                self._write(path, '%s rbps=max wbps=max riops=max wiops=max'
                            % lim.device.majmin)

    def io_bytes(self, leaf: str) -> Dict[str, Tuple[int, int]]:
        text = read_file(os.path.join(self.leaf_path(leaf), 'io.stat')) or ''
        out: Dict[str, Tuple[int, int]] = {}
        for line in text.splitlines():
            parts = line.split()
            if not parts:
                continue
            kv = dict(p.split('=', 1) for p in parts[1:] if '=' in p)
            out[parts[0]] = (int(kv.get('rbytes', 0)), int(kv.get('wbytes', 0)))
        return out
