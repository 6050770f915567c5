"""Active copies of one process: backend choice, the copy's record, its limits' start
and end, live re-limit.

This is the engine behind the Cinder-facing throttle and the CLI; it has no Cinder import
so that the CLI starts fast and works where Cinder is not installed.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from typing import Any, Dict, Iterator, List, Optional

from cinder_cgroup_throttle import (backends, budget, cleanup, devices, privileged,
                                    progress, relimit)
from cinder_cgroup_throttle.backends import CopyBackend
from cinder_cgroup_throttle.cgroups import CgroupDriver, DeviceLimit
from cinder_cgroup_throttle.cgroups.base import validate_cgroup_path
from cinder_cgroup_throttle.exception import CopyNotFound, ThrottleError
from cinder_cgroup_throttle.sharing import StaticLimits, device_limits, fair_shares
from cinder_cgroup_throttle.registry import Entry, Registry, process_start_time
from cinder_cgroup_throttle.statefiles import new_copy_id
from cinder_cgroup_throttle.units import format_rate

LOG = logging.getLogger(__name__)

DEFAULT_CGROUP = 'cinder-volume-copy'


class RunningCopy:
    """One copy of this process, from ``copy()`` entry to exit: its registry entry (the
    one record, which other processes read and re-limit) and its backend. ``entry`` is a
    cache of the record; :meth:`CopyManager.active` re-reads it."""

    def __init__(self, entry: Entry, backend: CopyBackend) -> None:
        self.entry = entry
        self.limiter = backend
        self.prefix: List[str] = []  # argv prefix of the copy's command

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def src(self) -> str:
        return self.entry.src

    @property
    def dst(self) -> str:
        return self.entry.dst

    @property
    def src_dev(self) -> Optional[devices.BlockDevice]:
        return self.entry.devices()[0]

    @property
    def dst_dev(self) -> Optional[devices.BlockDevice]:
        return self.entry.devices()[1]

    @property
    def volume_id(self) -> Optional[str]:
        return self.entry.volume_id

    @property
    def backend(self) -> str:
        return self.entry.backend

    @property
    def reason(self) -> str:
        return self.entry.reason

    @property
    def bps_limit(self) -> int:
        return self.entry.bps_limit

    @property
    def requested_bps(self) -> int:
        return int(self.entry.extra.get('requested_bps', self.entry.bps_limit))

    @property
    def limits(self) -> List[DeviceLimit]:
        return self.limiter.limits(self.entry)


class CopyManager:
    """Runs every copy under its own limit, through the backend ``backends.Selector``
    chooses (``backend``: one of ``backends.CHOICES``). With ``allow_unthrottled`` a copy
    that nothing can throttle runs without a limit instead of failing. ``executor``: how
    root's steps run (default: ``privileged.executor()``).
    """

    def __init__(self, cgroup_name: str = DEFAULT_CGROUP, grace: float = 10.0,
                 backend: str = backends.AUTO, allow_unthrottled: bool = False,
                 registry: Optional[Registry] = None, host_bps_limit: int = 0,
                 static: StaticLimits = StaticLimits(),
                 budget_config: Optional[budget.BudgetConfig] = None,
                 executor: Optional[privileged.Executor] = None) -> None:
        self.cgroup_name = validate_cgroup_path(cgroup_name)
        self.grace = grace
        self.registry = registry or Registry()
        self.executor = executor or privileged.executor()
        self.host_bps_limit = host_bps_limit  # total of all copies (0 = none), see sharing
        self.static = static
        self._lock = threading.Lock()
        self._copies: Dict[str, RunningCopy] = {}
        # Inside a delegated systemd unit or a container's cgroup namespace the leaves go
        # below the service's own cgroup (cgroups.placement, in backends.host_cgroup).
        self.selector = backends.Selector(backend, self.cgroup_name, self.executor,
                                          self.registry.directory, allow_unthrottled)
        self._owner_start = process_start_time(os.getpid())
        # A predecessor killed mid-copy (kill -9) left leaves, limits and entries behind.
        cleanup.clean_at_start(self.registry, self.selector.cgroup, self.executor)
        self.budget: Optional[budget.CopyBudget] = None
        if budget_config is not None:  # shared with the other hosts of the backend
            self.budget = budget.CopyBudget(budget_config, self._local_rates,
                                            self._apply_budget, self.registry.directory)
            self.budget.start()

    @property
    def backend(self) -> str:
        """The operator's choice (backends.CHOICES)."""
        return self.selector.mode

    @property
    def driver(self) -> Optional[CgroupDriver]:
        """This host's cgroup driver for the copies' leaves; None without one."""
        return self.selector.cgroup.driver if self.selector.cgroup else None

    def close(self) -> None:
        """Leave the backend's budget (copies still running keep their rates)."""
        if self.budget is not None:
            self.budget.stop()

    @contextlib.contextmanager
    def copy(self, src: str, dst: str, bps_limit: int,
             volume_id: Optional[str] = None,
             total_bytes: Optional[int] = None) -> Iterator[RunningCopy]:
        """Throttle one copy of ``src`` to ``dst`` at ``bps_limit`` bytes/s.

        Paths are checked before anything is created: a missing source raises
        DeviceResolutionError and leaves no trace.
        """
        src_dev = devices.resolve(src, must_exist=True)
        dst_dev = devices.resolve(dst, must_exist=False)
        requested, bps_limit = bps_limit, self._first_share(bps_limit)
        copy_id = new_copy_id()
        budget_bps = self.budget.admit(copy_id, bps_limit) if self.budget else None
        if budget_bps:
            bps_limit = min(bps_limit, budget_bps) if bps_limit else budget_bps
        try:
            backend, reason = self.selector.choose(
                src, dst, bps_limit, device_limits(src_dev, dst_dev, bps_limit, self.static))
        except ThrottleError:
            if self.budget:
                self.budget.release(copy_id)
            raise
        entry = Entry(
            id=copy_id, owner_pid=os.getpid(), owner_start=self._owner_start,
            src=src, dst=dst, src_dev=src_dev.majmin if src_dev else None,
            dst_dev=dst_dev.majmin if dst_dev else None,
            src_via_file=bool(src_dev and src_dev.via_file),
            dst_via_file=bool(dst_dev and dst_dev.via_file),
            bps_limit=bps_limit, backend=backend.name, reason=reason, started=time.time(),
            volume_id=volume_id, total_bytes=total_bytes,
            extra=dict(relimit.policy_extra(requested, self.host_bps_limit, self.static),
                       budget_bps=budget_bps))
        copy = RunningCopy(entry, backend)
        with contextlib.ExitStack() as stack:
            if self.budget:  # last: when the copy and its entry are gone, or it failed
                stack.callback(self.budget.release, copy_id)
            copy.prefix = backend.start(entry)
            stack.callback(backend.stop, entry, self.grace)
            if self.host_bps_limit:  # after the entry is gone: the others get its share
                stack.callback(self._rebalance)
            self.registry.save(entry)
            stack.callback(self._unregister, copy_id)
            with self._lock:
                self._copies[copy_id] = copy
            stack.callback(self._forget, copy_id)
            if self.host_bps_limit:
                self._rebalance()
            LOG.info('copy %s: %s -> %s at %s via %s (%s)', copy_id, src, dst,
                     format_rate(bps_limit), backend.name, reason)
            stack.push(functools.partial(self._record_end, copy))  # first, leaf still there
            yield copy

    def _record_end(self, copy: RunningCopy, exc_type: Any, *exc: Any) -> None:
        """A volume's progress must read 100% (or failed) after its entry is gone."""
        if copy.volume_id:
            try:
                progress.record_finished(self.registry,
                                         self.registry.load(copy.id) or copy.entry,
                                         exc_type is None, self.executor)
            except (OSError, ThrottleError) as error:
                LOG.warning('copy %s: cannot record its end: %s', copy.id, error)

    def _unregister(self, copy_id: str) -> None:
        # Under the re-balancing lock: a concurrent rebalance saves the entries it loaded,
        # and would otherwise write an ended copy's entry back.
        with relimit.locked(self.registry):
            self.registry.remove(copy_id)

    def _forget(self, copy_id: str) -> None:
        with self._lock:
            self._copies.pop(copy_id, None)

    def active(self) -> List[RunningCopy]:
        """This process's copies, their records re-read (another process may have
        re-limited them)."""
        with self._lock:
            copies = list(self._copies.values())
        self._sync([e for e in (self.registry.load(c.id) for c in copies) if e is not None])
        return copies

    def find(self, ident: str) -> RunningCopy:
        """An active copy by copy id or volume id."""
        for copy in self.active():
            if ident in (copy.id, copy.volume_id):
                return copy
        raise CopyNotFound('no active copy with id or volume id %r' % ident)

    def _first_share(self, requested: int) -> int:
        """A new copy's rate before it starts: its fair share next to this process's
        active copies (``_rebalance`` settles races with copies starting concurrently)."""
        if not self.host_bps_limit:
            return requested
        with self._lock:
            others = {c.id: c.requested_bps for c in self._copies.values()}
        return fair_shares(dict(others, **{'': requested}), self.host_bps_limit)['']

    def _rebalance(self) -> None:
        self._sync(relimit.rebalance(self.registry, executor=self.executor))

    def _sync(self, entries: List[Entry]) -> None:
        """Refresh the cached records of this process's copies (the registry is the
        source of truth)."""
        with self._lock:
            for entry in entries:
                copy = self._copies.get(entry.id)
                if copy is not None:
                    copy.entry = entry

    def _local_rates(self) -> Dict[str, int]:
        """What each throttled copy of this process could use without the budget: its
        own limit within the host cap (0 = unlimited). From the registry, so that a
        set-limit from the CLI counts."""
        entries = [e for e in self.registry.entries()
                   if e.owner_pid == os.getpid() and backends.throttles(e)]
        return fair_shares({e.id: int(e.extra.get('requested_bps', e.bps_limit))
                            for e in entries}, self.host_bps_limit)

    def _apply_budget(self, shares: Dict[str, Optional[int]]) -> List[str]:
        """Put budget shares in force (None: the local rate); the copies it found."""
        entries = relimit.rebalance(self.registry, budgets=shares, executor=self.executor)
        self._sync(entries)
        return [e.id for e in entries if e.id in shares]

    def set_limit(self, ident: str, bps_limit: int) -> RunningCopy:
        """Change a running copy's rate (by copy id or volume id) as the CLI does; it is
        in force at once, within this process's host-wide cap."""
        copy = self.find(ident)
        self._sync([relimit.set_limit(copy.id, bps_limit, self.registry, self.executor)])
        LOG.info('copy %s: limit changed to %s', copy.id, format_rate(copy.bps_limit))
        return copy
