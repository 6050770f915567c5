"""Crash safety: find and remove what copies of a dead process left behind.

When cinder-volume (or a CLI copy) is killed with SIGKILL mid-copy, its context managers
never run: the copy's leaf cgroup (with its limits) and its registry entry stay. They are
removed here, at the next CopyManager start and by ``cinder-cgroup-throttle cleanup``.

Only what this package provably created is touched:

* registry entries in our state directory whose owner process is gone (pid absent, or
  reused by a process that started later than the recorded owner);
* leaf cgroups named ``copy-<owner pid>-<8 hex>`` (``statefiles.COPY_ID``) directly under
  our parent cgroup, or recorded in such an entry, whose owner is gone;
* the pv pipeline's files next to the entry (``<id>.pipe.json``, ``<id>.rate``) once the
  pipeline process that wrote them is gone too.

Anything in the state directory that is not a valid file of ours (a link, a FIFO, an
entry whose fields do not type-check or whose id is not its file name, ...) is reported
as ``foreign`` and left alone (statefiles.py).

A leaf that still holds processes (an orphaned dd that outlived its owner) is never touched,
and neither is its registry entry, so ``status`` keeps showing that copy; the same holds
for a pv pipeline that is still running. For cgroups ``rmdir`` is the
only removal used, and the kernel refuses it (EBUSY) for a populated cgroup, so a process
that entered the leaf after our check is safe too. Removing a leaf removes its limits: they
live in the leaf's files (v1 ``blkio.throttle.*``, v2 ``io.max``).
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import time
from typing import List, Optional, Set, Tuple


from cinder_cgroup_throttle import pipeline, privileged
from cinder_cgroup_throttle.cgroups import CgroupDriver, detect
from cinder_cgroup_throttle.cgroups.base import validate_cgroup_path
from cinder_cgroup_throttle.cgroups.blkio_v1 import BlkioV1Driver
from cinder_cgroup_throttle.cgroups.io_v2 import IoV2Driver
from cinder_cgroup_throttle.exception import ThrottleError
from cinder_cgroup_throttle.registry import Entry, Registry, process_alive
from cinder_cgroup_throttle.statefiles import (BUDGET_NAME, COPY_ID, STATE_NAME, TEMP_NAME,
                                               ForeignFile)

LOG = logging.getLogger(__name__)

_TEMP_MAX_AGE = 60.0
_HELPER_GRACE = 5.0


@dataclasses.dataclass
class Action:
    """One thing cleanup removed, would remove (dry run) or left alone, and why."""

    kind: str  # 'cgroup', 'registry', 'pipefile', 'tempfile', 'budget' or 'foreign'
    target: str  # cgroup path, copy id or file path
    action: str  # 'removed', 'would remove', 'kept' or 'failed'
    reason: str

    def __str__(self) -> str:
        return '%-12s %-8s %s: %s' % (self.action, self.kind, self.target, self.reason)


def driver_for(controller: str, mountpoint: str, parent: str) -> CgroupDriver:
    """A driver for a hierarchy named in a registry entry, checked against the mount table
    so that a forged or stale entry cannot make us rmdir outside a cgroup filesystem."""
    host = detect()
    if controller == 'blkio' and mountpoint == host.v1_blkio:
        return BlkioV1Driver(mountpoint, parent)
    if controller == 'io' and mountpoint == host.v2_root:
        return IoV2Driver(mountpoint, parent)
    raise ThrottleError('%s is not the mounted %s cgroup hierarchy' % (mountpoint, controller))


def entry_leaf(entry: Entry) -> Optional[Tuple[CgroupDriver, str]]:
    """(driver, leaf) of a cgroup-backend entry; None for other backends.

    Raises ThrottleError when the recorded cgroup is not one of ours.
    """
    if not entry.cgroup:
        return None
    controller, _, path = entry.cgroup.partition(':')
    parent, _, leaf = path.rpartition('/')
    if leaf != entry.id or not COPY_ID.match(leaf) or not entry.mountpoint:
        raise ThrottleError('registry entry %s names cgroup %r, which is not a copy leaf'
                            % (entry.id, entry.cgroup))
    return driver_for(controller, entry.mountpoint, validate_cgroup_path(parent)), leaf


class Cleaner:
    """Finds the leftovers of dead owners in one registry and under one parent cgroup."""

    def __init__(self, registry: Registry, driver: Optional[CgroupDriver],
                 dry_run: bool = False) -> None:
        self.registry = registry
        self.driver = driver
        self.dry_run = dry_run
        self.actions: List[Action] = []
        self._removed: Set[str] = set()  # registry entries removed (or would be)

    def run(self) -> List[Action]:
        handled: Set[str] = set()
        entries, foreign = self.registry.scan()
        for exc in foreign:
            self._note('foreign', os.path.join(self.registry.directory, exc.name), 'kept',
                       exc.reason)
        for entry in entries:
            if not entry.owner_alive():
                self._entry(entry)
            handled.add(entry.id)
        if self.driver is not None:
            for leaf in self.driver.leaves():
                if leaf not in handled:
                    self._orphan_leaf(self.driver, leaf)
        self._state_files(handled)
        return self.actions

    def _note(self, kind: str, target: str, action: str, reason: str) -> None:
        self.actions.append(Action(kind, target, action, reason))
        LOG.log(logging.WARNING if action in ('kept', 'failed') else logging.INFO,
                'cleanup: %s', self.actions[-1])

    def _entry(self, entry: Entry) -> None:
        dead = 'owner pid %d is gone' % entry.owner_pid
        try:
            located = entry_leaf(entry)
        except ThrottleError as exc:
            self._note('registry', entry.id, 'kept', str(exc))
            return
        if located is not None and not self._remove_leaf(*located, reason=dead):
            return  # keep the entry while its cgroup (and copy) lives on
        try:
            if self._pipeline_alive(entry.id):
                self._note('registry', entry.id, 'kept',
                           dead + ', but its pv pipeline runs on')
                return
        except ForeignFile as exc:
            self._note('registry', entry.id, 'kept', str(exc))
            return
        self._remove_entry(entry.id, dead)

    def _orphan_leaf(self, driver: CgroupDriver, leaf: str) -> None:
        match = COPY_ID.match(leaf)
        if not match:
            return  # not created by this package
        pid = int(match.group(1))
        try:
            created = os.stat(driver.leaf_path(leaf)).st_mtime
        except FileNotFoundError:
            return
        # The owner made the leaf, so it must have started before the leaf's mtime.
        if process_alive(pid, created):
            return
        self._remove_leaf(driver, leaf, 'owner pid %d is gone and no registry entry '
                          'names it' % pid)

    def _remove_leaf(self, driver: CgroupDriver, leaf: str, reason: str) -> bool:
        """True when the leaf is gone (or would be, in a dry run)."""
        path = driver.leaf_path(leaf)
        if not os.path.isdir(path):
            return True
        pids = driver.pids(leaf)
        if pids:
            self._note('cgroup', path, 'kept', '%s, but processes %s still run in it'
                       % (reason, ' '.join(map(str, pids))))
            return False
        if self.dry_run:
            self._note('cgroup', path, 'would remove', reason)
            return True
        try:
            self._rmdir(driver, leaf)
        except FileNotFoundError:
            return True  # another cleaner was faster
        except OSError as exc:
            busy = exc.errno == errno.EBUSY
            self._note('cgroup', path, 'kept' if busy else 'failed',
                       'a process entered it' if busy else 'rmdir: %s' % exc.strerror)
            return False
        except ThrottleError as exc:
            self._note('cgroup', path, 'failed', str(exc))
            return False
        self._note('cgroup', path, 'removed', reason + ' (its limits went with it)')
        return True

    def _rmdir(self, driver: CgroupDriver, leaf: str) -> None:
        path = driver.leaf_path(leaf)
        try:
            os.rmdir(path)
        except PermissionError:
            # Not root: the root helper removes it (CopyManager's own driver, whose
            # parent is the only one the rootwrap filters admit). The leaf was just seen
            # empty and its owner is dead, so nothing can be in it to be killed.
            if not (isinstance(self.driver, privileged.PrivilegedDriver)
                    and self.driver.leaf_path(leaf) == path):
                raise
            self.driver.remove_leaf(leaf, grace=_HELPER_GRACE)

    def _remove_entry(self, copy_id: str, reason: str) -> None:
        self._removed.add(copy_id)
        if self.dry_run:
            self._note('registry', copy_id, 'would remove', reason)
            return
        self.registry.remove(copy_id)
        self._note('registry', copy_id, 'removed', reason)

    def _pipeline_alive(self, copy_id: str) -> bool:
        """Raises ForeignFile when the pipeline's state is not one it wrote."""
        state = pipeline.read_pipe_state(self.registry.directory, copy_id)
        return bool(state) and process_alive(state['wrapper_pid'], state['started'])

    def _state_files(self, entry_ids: Set[str]) -> None:
        """Pipeline files without a live pipeline, and half-written files (a writer was
        killed between mkstemp and rename) of dead processes."""
        for name in self.registry.files.names():
            pipe, temp = STATE_NAME.match(name), TEMP_NAME.match(name)
            if (pipe and pipe.group(2) != 'json'
                    and pipe.group(1) not in entry_ids - self._removed):
                try:
                    alive = self._pipeline_alive(pipe.group(1))
                except ForeignFile as exc:
                    self._note('foreign', os.path.join(self.registry.directory, exc.name),
                               'kept', exc.reason)
                    continue
                if not alive:
                    self._remove_file('pipefile', name, 'its copy and pipeline are gone')
            elif temp and self._stale_temp(name, int(temp.group(2) or temp.group(3) or 0)):
                self._remove_file('tempfile', name, 'its writer is gone')
            elif BUDGET_NAME.match(name) and not process_alive(
                    int(BUDGET_NAME.match(name).group(1)), None):
                self._remove_file('budget', name, 'its process is gone (budget.py)')

    def _stale_temp(self, name: str, pid: int) -> bool:
        # The pid in the name is the copy's owner; a pipeline may outlive it and still be
        # writing, so only files older than any write are stale.
        try:
            age = time.time() - self.registry.files.lstat(name).st_mtime
        except FileNotFoundError:
            return False
        # A finished record's temporary file names no writer (pid 0): its age alone.
        return age > _TEMP_MAX_AGE and not (pid and process_alive(pid, None))

    def _remove_file(self, kind: str, name: str, reason: str) -> None:
        path = os.path.join(self.registry.directory, name)
        try:
            regular = stat.S_ISREG(self.registry.files.lstat(name).st_mode)
        except FileNotFoundError:
            return
        if not regular:
            self._note('foreign', path, 'kept', 'not a regular file')
        elif self.dry_run:
            self._note(kind, path, 'would remove', reason)
        elif self.registry.files.remove(name):
            self._note(kind, path, 'removed', reason)


def clean(registry: Registry, driver: Optional[CgroupDriver],
          dry_run: bool = False) -> List[Action]:
    """Remove (or with ``dry_run`` list) the leftovers of dead owners."""
    return Cleaner(registry, driver, dry_run).run()


def clean_at_start(registry: Registry, driver: Optional[CgroupDriver]) -> None:
    """CopyManager start-up: best effort, a failure here must not stop the service."""
    try:
        clean(registry, driver)
    except (OSError, ThrottleError) as exc:
        LOG.warning('cleanup of leftovers from earlier runs failed: %s', exc)
