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

This module finds them; what one copy left is its backend's to remove
(``CopyBackend.reclaim``, rebuilt from the entry; ``CgroupBackend.reclaim_orphans`` for
leaves no entry names), with the rights of the injected executor.

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

import logging
import os
import stat
import time
from typing import List, Optional, Set

from cinder_cgroup_throttle import backends, privileged
from cinder_cgroup_throttle.backends import Action, CgroupBackend
from cinder_cgroup_throttle.backends.pv import PvBackend
from cinder_cgroup_throttle.exception import ThrottleError
from cinder_cgroup_throttle.registry import Entry, Registry, process_alive
from cinder_cgroup_throttle.statefiles import BUDGET_NAME, STATE_NAME, TEMP_NAME, ForeignFile

LOG = logging.getLogger(__name__)

_TEMP_MAX_AGE = 60.0


class Cleaner:
    """Finds the leftovers of dead owners in one registry and under the parent cgroup of
    ``host`` (this host's cgroup backend, None without one); what each copy left is its
    backend's to remove (``CopyBackend.reclaim``), with ``executor``'s rights."""

    def __init__(self, registry: Registry, host: Optional[CgroupBackend],
                 executor: privileged.Executor, dry_run: bool = False) -> None:
        self.registry = registry
        self.host = host
        self.executor = executor
        self.dry_run = dry_run
        self.actions: List[Action] = []
        self._removed: Set[str] = set()  # registry entries removed (or would be)

    def run(self) -> List[Action]:
        handled: Set[str] = set()
        entries, foreign = self.registry.scan()
        for exc in foreign:
            self._note(Action('foreign', os.path.join(self.registry.directory, exc.name),
                              'kept', exc.reason))
        for entry in entries:
            if not entry.owner_alive():
                self._entry(entry)
            handled.add(entry.id)
        if self.host is not None:
            for action in self.host.reclaim_orphans(handled, self.dry_run):
                self._note(action)
        self._state_files(handled)
        return self.actions

    def _note(self, action: Action) -> None:
        self.actions.append(action)
        LOG.log(logging.WARNING if action.action in ('kept', 'failed') else logging.INFO,
                'cleanup: %s', action)

    def _entry(self, entry: Entry) -> None:
        try:
            gone, actions = backends.for_entry(entry, self.executor, self.registry.directory
                                               ).reclaim(entry, self.dry_run)
        except ThrottleError as exc:
            gone, actions = False, [Action('registry', entry.id, 'kept', str(exc))]
        for action in actions:
            self._note(action)
        if gone:  # else the entry stays while its copy lives on, so status shows it
            self._remove_entry(entry.id, 'owner pid %d is gone' % entry.owner_pid)

    def _remove_entry(self, copy_id: str, reason: str) -> None:
        self._removed.add(copy_id)
        if self.dry_run:
            self._note(Action('registry', copy_id, 'would remove', reason))
            return
        self.registry.remove(copy_id)
        self._note(Action('registry', copy_id, 'removed', reason))

    def _state_files(self, entry_ids: Set[str]) -> None:
        """Pipeline files without a live pipeline, and half-written files (a writer was
        killed between mkstemp and rename) of dead processes."""
        pv = PvBackend(self.executor, self.registry.directory)
        for name in self.registry.files.names():
            pipe, temp = STATE_NAME.match(name), TEMP_NAME.match(name)
            if (pipe and pipe.group(2) != 'json'
                    and pipe.group(1) not in entry_ids - self._removed):
                try:
                    alive = pv.pipeline_alive(pipe.group(1))
                except ForeignFile as exc:
                    self._note(Action('foreign', os.path.join(self.registry.directory,
                                                              exc.name), 'kept', exc.reason))
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
            self._note(Action('foreign', path, 'kept', 'not a regular file'))
        elif self.dry_run:
            self._note(Action(kind, path, 'would remove', reason))
        elif self.registry.files.remove(name):
            self._note(Action(kind, path, 'removed', reason))


def clean(registry: Registry, host: Optional[CgroupBackend], dry_run: bool = False,
          executor: Optional[privileged.Executor] = None) -> List[Action]:
    """Remove (or with ``dry_run`` list) the leftovers of dead owners; ``executor``: how
    root's steps run (default: this process's)."""
    return Cleaner(registry, host, executor or privileged.executor(), dry_run).run()


def clean_at_start(registry: Registry, host: Optional[CgroupBackend],
                   executor: privileged.Executor) -> None:
    """CopyManager start-up: best effort, a failure here must not stop the service."""
    try:
        clean(registry, host, executor=executor)
    except (OSError, ThrottleError) as exc:
        LOG.warning('cleanup of leftovers from earlier runs failed: %s', exc)
