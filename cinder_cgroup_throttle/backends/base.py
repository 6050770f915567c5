"""The one small interface behind which every way of limiting a copy lives.

A backend turns a copy's registry entry into an argv prefix with the entry's limits in
force (:meth:`CopyBackend.start`), changes its rate while it runs, reports its progress,
tears it down when its command ended and removes what a dead owner's copy left behind.
Every method works from the entry alone, so any process (the owner, the CLI, monitoring)
rebuilds the same backend with :meth:`CopyBackend.from_entry` and acts on the same record.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, ClassVar, List, Optional, Tuple

from cinder_cgroup_throttle.cgroups.base import DeviceLimit

if TYPE_CHECKING:
    from cinder_cgroup_throttle.privileged import Executor
    from cinder_cgroup_throttle.registry import Entry

#: (bytes done, where the count came from, argv of the copy's processes)
Done = Tuple[Optional[int], str, List[List[str]]]
NOTHING_DONE: Done = (None, 'none', [])


@dataclasses.dataclass
class Action:
    """One thing crash cleanup removed, would remove (dry run) or left alone, and why."""

    kind: str  # 'cgroup', 'registry', 'pipefile', 'tempfile', 'budget' or 'foreign'
    target: str  # cgroup path, copy id or file path
    action: str  # 'removed', 'would remove', 'kept' or 'failed'
    reason: str

    def __str__(self) -> str:
        return '%-12s %-8s %s: %s' % (self.action, self.kind, self.target, self.reason)


class CopyBackend(abc.ABC):
    """One way of limiting a copy; ``name`` is what its entries record (Entry.backend)."""

    name: ClassVar[str]
    throttles: ClassVar[bool] = True  # False: the copy runs without a limit

    def __init__(self, executor: 'Executor', state_dir: str) -> None:
        self.executor = executor
        self.state_dir = state_dir

    @classmethod
    def from_entry(cls, entry: 'Entry', executor: 'Executor',
                   state_dir: str) -> 'CopyBackend':
        """The backend of a running copy, from its record alone (any process); raises
        ThrottleError when the record names something that is not ours."""
        return cls(executor, state_dir)

    @abc.abstractmethod
    def start(self, entry: 'Entry') -> List[str]:
        """Put the entry's limits in force before its command runs; the argv prefix that
        runs the command under them. Records in ``entry`` where the limits live."""

    @abc.abstractmethod
    def set_rate(self, entry: 'Entry', bps: int) -> None:
        """Put ``bps`` in force for the running copy (``entry.bps_limit``: the current)."""

    @abc.abstractmethod
    def bytes_done(self, entry: 'Entry') -> Done:
        """How far the copy is, by the backend's own counters."""

    @abc.abstractmethod
    def stop(self, entry: 'Entry', grace: float) -> None:
        """The copy's command ended (or failed to start): remove what :meth:`start` made."""

    @abc.abstractmethod
    def reclaim(self, entry: 'Entry', dry_run: bool) -> Tuple[bool, List[Action]]:
        """The owner died: remove what the copy left besides its entry. Returns whether
        the entry may go (False while the copy's processes live on) and what was done."""

    def limits(self, entry: 'Entry') -> List[DeviceLimit]:
        """The device limits in force for the copy (a pv pipeline has a rate only)."""
        return []
