"""cgroup v2 io driver: one ``io.max`` line per device on the leaf.

v2 is hierarchical: ``+io`` has to be enabled in ``cgroup.subtree_control`` of every
ancestor, and a cgroup that holds processes cannot enable controllers for its children
(the parent therefore never gets any). ``+memory`` is enabled alongside where offered so
that page-cache writeback is charged to the copy's cgroup and throttled too.

On a real v2 host the caller sits in a service's cgroup (not in the exempt root cgroup),
and a subtree may be delegated with fewer controllers: each level is therefore checked on
its own, and the two ways this fails are reported as such rather than as a bare errno.
"""
from __future__ import annotations

import errno
import os
from typing import Dict, Iterable, Tuple

from cinder_cgroup_throttle.cgroups.base import CgroupDriver, DeviceLimit, read_file
from cinder_cgroup_throttle.exception import CgroupOperationError


class IoV2Driver(CgroupDriver):
    controller = 'io'

    def ensure_parent(self) -> bool:
        level, created = self.mountpoint, False
        for segment in self.parent.split('/'):
            self._delegate(level)
            level = os.path.join(level, segment)
            try:
                os.mkdir(level)
                created = True
            except FileExistsError:
                created = False
            except OSError as exc:
                raise CgroupOperationError(
                    'cannot create cgroup %s: %s' % (level, exc)) from exc
        self._delegate(level)
        return created

    def _delegate(self, path: str) -> None:
        """Enable io, and memory where offered, for the children of cgroup ``path``."""
        offered = read_file(os.path.join(path, 'cgroup.controllers'))
        if offered is None:  # removed by another copy's end: create_leaf starts over
            raise FileNotFoundError(errno.ENOENT, 'cgroup vanished', path)
        available = offered.split()
        if 'io' not in available:
            raise CgroupOperationError(
                'cgroup %s does not offer the io controller (cgroup.controllers: %s); enable '
                'io in its parent\'s cgroup.subtree_control or choose another parent cgroup'
                % (path, ' '.join(available) or 'none'))
        control = os.path.join(path, 'cgroup.subtree_control')
        enabled = (read_file(control) or '').split()
        for controller in ('io', 'memory'):
            if controller not in available or controller in enabled:
                continue
            try:
                with open(control, 'w') as f:
                    f.write('+' + controller)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise CgroupOperationError('writing "+%s" to %s failed: %s'
                                               % (controller, control, exc)) from exc
                procs = ' '.join((read_file(os.path.join(path, 'cgroup.procs')) or '').split()[:5])
                raise CgroupOperationError(
                    'cannot enable %s for the children of cgroup %s: it holds processes (%s), '
                    'and cgroup v2 lets only a cgroup without processes pass controllers on; '
                    'configure a parent cgroup outside any service\'s cgroup, such as a '
                    'top-level name' % (controller, path, procs or 'exited')) from exc

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
