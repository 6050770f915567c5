"""A leaf cgroup per copy with the copy's device limits; the command runs in it via cgexec.

What cgroup v1 (blkio) and v2 (io) share; the version-specific file formats live in the
drivers (cgroups/blkio_v1.py, cgroups/io_v2.py) and each version's backend in its own
module (cgroup_v1.py, cgroup_v2.py). Every write goes through the executor's driver:
directly as root, through the privsep daemon otherwise.
"""
from __future__ import annotations

import logging
import os
from typing import ClassVar, List, Set, Tuple, Type

import psutil

from cinder_cgroup_throttle.backends.base import Action, CopyBackend, Done
from cinder_cgroup_throttle.cgroups import CgroupDriver, DeviceLimit, detect
from cinder_cgroup_throttle.cgroups.base import validate_cgroup_path
from cinder_cgroup_throttle.exception import ThrottleError
from cinder_cgroup_throttle.limits import plan_limits
from cinder_cgroup_throttle.privileged import Executor
from cinder_cgroup_throttle.registry import Entry, process_alive
from cinder_cgroup_throttle.statefiles import COPY_ID

LOG = logging.getLogger(__name__)


class CgroupBackend(CopyBackend):
    """Leaves under one parent cgroup of one hierarchy (``driver``)."""

    name = 'cgroup'
    controller: ClassVar[str]  # what cgexec -g and the entry name
    driver_class: ClassVar[Type[CgroupDriver]]
    host_mount: ClassVar[str]  # the CgroupHost field with this version's mountpoint

    def __init__(self, executor: Executor, state_dir: str, driver: CgroupDriver) -> None:
        super().__init__(executor, state_dir)
        self.driver = driver

    @classmethod
    def for_driver(cls, executor: Executor, state_dir: str,
                   driver: CgroupDriver) -> 'CgroupBackend':
        """The backend of the version ``driver`` speaks."""
        for version in cls.__subclasses__():
            if version.controller == driver.controller:
                return version(executor, state_dir, driver)
        raise ThrottleError('no backend for the %s controller' % driver.controller)

    @classmethod
    def from_entry(cls, entry: Entry, executor: Executor, state_dir: str) -> 'CgroupBackend':
        """Checked against the mount table, so that a forged or stale entry cannot make
        us write or rmdir outside a cgroup filesystem."""
        controller, _, path = (entry.cgroup or '').partition(':')
        parent, _, leaf = path.rpartition('/')
        if leaf != entry.id or not COPY_ID.match(leaf) or not entry.mountpoint:
            raise ThrottleError('registry entry %s names cgroup %r, which is not a copy leaf'
                                % (entry.id, entry.cgroup))
        host = detect()
        for version in cls.__subclasses__():
            if (version.controller == controller
                    and entry.mountpoint == getattr(host, version.host_mount)):
                driver = version.driver_class(entry.mountpoint, validate_cgroup_path(parent))
                return version(executor, state_dir, executor.wrap(driver))
        raise ThrottleError('%s is not the mounted %s cgroup hierarchy'
                            % (entry.mountpoint, controller))

    def reason(self, limits: List[DeviceLimit]) -> str:
        return '%s limit on %s' % (self.controller, limits[0].device)

    def start(self, entry: Entry) -> List[str]:
        self.driver.create_leaf(entry.id, entry.device_limits())
        entry.cgroup = '%s:%s/%s' % (self.controller, self.driver.parent, entry.id)
        entry.mountpoint = self.driver.mountpoint
        return self.driver.prefix(entry.id)

    def set_rate(self, entry: Entry, bps: int) -> None:
        self.driver.write_limits(entry.id, entry.device_limits(bps),
                                 previous=entry.device_limits())

    def limits(self, entry: Entry) -> List[DeviceLimit]:
        return entry.device_limits()

    def bytes_done(self, entry: Entry) -> Done:
        """The larger of the leaf's own counters in the direction the limit is on (they
        count what the throttle charged and outlive the copy's processes) and the I/O
        counters of the leaf's processes (which also see buffered writes v1 does not
        charge): each can only lag behind the copy."""
        planned = plan_limits(*entry.devices(), 1)  # the direction the copy's limit is on
        writes = bool(planned and planned[0].wbps)
        device = planned[0].device.majmin if planned else None
        counters = self.driver.io_bytes(entry.id)
        best, source = None, 'none'
        if device in counters:
            best, source = counters[device][1 if writes else 0], 'cgroup'
        chars, argvs = 0, []
        for pid in self.driver.pids(entry.id):
            try:
                proc = psutil.Process(pid)
                io = proc.io_counters()
                argvs.append(proc.cmdline())
            except psutil.Error:
                continue
            chars += io.write_chars if writes else io.read_chars
        if argvs and (best is None or chars > best):
            best, source = chars, 'psutil'
        return best, source, argvs

    def stop(self, entry: Entry, grace: float) -> None:
        killed = self.driver.remove_leaf(entry.id, grace)
        if killed:
            LOG.warning('copy %s: killed leftover processes %s before removing its cgroup',
                        entry.id, killed)

    def reclaim(self, entry: Entry, dry_run: bool) -> Tuple[bool, List[Action]]:
        return self._reclaim_leaf(entry.id, 'owner pid %d is gone' % entry.owner_pid, dry_run)

    def reclaim_orphans(self, known: Set[str], dry_run: bool) -> List[Action]:
        """Leaves of dead owners under our parent that no entry names (the owner died
        between creating the leaf and recording it)."""
        actions: List[Action] = []
        for leaf in self.driver.leaves():
            match = COPY_ID.match(leaf)
            if leaf in known or not match:
                continue  # named by an entry, or not created by this package
            pid = int(match.group(1))
            try:
                created = os.stat(self.driver.leaf_path(leaf)).st_mtime
            except FileNotFoundError:
                continue
            # The owner made the leaf, so it must have started before the leaf's mtime.
            if not process_alive(pid, created):
                actions += self._reclaim_leaf(leaf, 'owner pid %d is gone and no registry '
                                              'entry names it' % pid, dry_run)[1]
        return actions

    def _reclaim_leaf(self, leaf: str, reason: str,
                      dry_run: bool) -> Tuple[bool, List[Action]]:
        """Remove an empty leaf; (gone, or would be in a dry run; what was done). A leaf
        with processes is never touched, and ``rmdir`` fails for one a process entered
        after the check."""
        path = self.driver.leaf_path(leaf)
        if not os.path.isdir(path):
            return True, []
        pids = self.driver.pids(leaf)
        if pids:
            return False, [Action('cgroup', path, 'kept', '%s, but processes %s still run '
                                  'in it' % (reason, ' '.join(map(str, pids))))]
        if dry_run:
            return True, [Action('cgroup', path, 'would remove', reason)]
        try:
            gone, _ = self.driver.try_remove_leaf(leaf)
        except ThrottleError as exc:
            return False, [Action('cgroup', path, 'failed', str(exc))]
        if not gone:
            return False, [Action('cgroup', path, 'kept', 'a process entered it')]
        return True, [Action('cgroup', path, 'removed', reason + ' (its limits went with it)')]
