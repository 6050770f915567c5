"""Active copies of one process: per-copy cgroup lifecycle, limits, live re-limit.

This is the engine behind the Cinder-facing throttle and the CLI; it has no Cinder import
so that the CLI starts fast and works where Cinder is not installed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional

from cinder_cgroup_throttle import (budget, cleanup, devices, pipeline, privileged,
                                    progress, relimit)
from cinder_cgroup_throttle.cgroups import CgroupDriver, DeviceLimit, placement
from cinder_cgroup_throttle.cgroups.base import validate_cgroup_path
from cinder_cgroup_throttle.exception import (CgroupUnavailable, CopyNotFound,
                                              ThrottleError)
from cinder_cgroup_throttle.sharing import (StaticLimits, device_limits, fair_shares,
                                            pipe_rate)
from cinder_cgroup_throttle.registry import Entry, Registry, process_start_time
from cinder_cgroup_throttle.statefiles import new_copy_id
from cinder_cgroup_throttle.units import format_rate

LOG = logging.getLogger(__name__)

DEFAULT_CGROUP = 'cinder-volume-copy'
BACKENDS = ('auto', 'cgroup', 'pv')
PIPE_COMMAND = 'cinder-cgroup-throttle-pipe'


@dataclasses.dataclass
class ActiveCopy:
    """One throttled copy, from ``subcommand`` entry to exit."""

    id: str
    src: str
    dst: str
    src_dev: Optional[devices.BlockDevice]
    dst_dev: Optional[devices.BlockDevice]
    bps_limit: int
    backend: str
    reason: str
    prefix: List[str]
    limits: List[DeviceLimit]
    started: float = dataclasses.field(default_factory=time.time)
    volume_id: Optional[str] = None
    total_bytes: Optional[int] = None
    requested_bps: int = 0  # its own limit; bps_limit is lower under a host-wide cap
    budget_bps: Optional[int] = None  # its share of the backend's budget (budget.py)


def pipe_command() -> Optional[str]:
    """How to run the pv fallback's wrapper, None when it is not installed: its name when
    PATH finds it or when not root (rootwrap's filters match the name and its exec_dirs
    find it), else its path beside this interpreter (a root cinder-volume in a venv whose
    bin is not on PATH)."""
    beside = os.path.join(os.path.dirname(sys.executable), PIPE_COMMAND)
    installed_beside = os.access(beside, os.X_OK)
    if shutil.which(PIPE_COMMAND) or (os.geteuid() != 0 and installed_beside):
        return PIPE_COMMAND
    return beside if installed_beside else None


class CopyManager:
    """Runs every copy under its own limit: a leaf cgroup, or the pv pipeline as fallback.

    ``backend``: 'cgroup' (fail if a cgroup cannot throttle the copy), 'pv' (always the
    pipeline) or 'auto' (cgroup when the host has a usable controller and a side of the
    copy is on a block device, else pv). With ``allow_unthrottled`` a copy that nothing can
    throttle runs without a limit instead of failing.
    """

    def __init__(self, cgroup_name: str = DEFAULT_CGROUP, grace: float = 10.0,
                 driver: Optional[CgroupDriver] = None, backend: str = 'auto',
                 allow_unthrottled: bool = False,
                 registry: Optional[Registry] = None, host_bps_limit: int = 0,
                 static: StaticLimits = StaticLimits(),
                 budget_config: Optional[budget.BudgetConfig] = None) -> None:
        if backend not in BACKENDS:
            raise ThrottleError('backend must be one of %s, not %r'
                                % ('|'.join(BACKENDS), backend))
        self.cgroup_name = validate_cgroup_path(cgroup_name)
        self.grace = grace
        self.backend = backend
        self.allow_unthrottled = allow_unthrottled
        self.registry = registry or Registry()
        self.host_bps_limit = host_bps_limit  # total of all copies (0 = none), see sharing
        self.static = static
        self._lock = threading.Lock()
        self._copies: Dict[str, ActiveCopy] = {}
        self._unavailable: Optional[CgroupUnavailable] = None
        self.driver: Optional[CgroupDriver] = driver
        if driver is None and backend != 'pv':
            try:
                # Inside a delegated systemd unit or a container's cgroup namespace the
                # leaves go below the service's own cgroup (cgroups.placement).
                self.driver = privileged.host_driver(placement.place(self.cgroup_name))
            except CgroupUnavailable as exc:
                LOG.warning('cgroup throttling unavailable: %s', exc)
                self._unavailable = exc
        self._owner_start = process_start_time(os.getpid())
        # A predecessor killed mid-copy (kill -9) left leaves, limits and entries behind.
        cleanup.clean_at_start(self.registry, self.driver)
        self.budget: Optional[budget.CopyBudget] = None
        if budget_config is not None:  # shared with the other hosts of the backend
            self.budget = budget.CopyBudget(budget_config, self._local_rates,
                                            self._apply_budget, self.registry.directory)
            self.budget.start()

    def close(self) -> None:
        """Leave the backend's budget (copies still running keep their rates)."""
        if self.budget is not None:
            self.budget.stop()

    def _choose_backend(self, src: str, dst: str, limits: List[DeviceLimit],
                        bps: int) -> tuple:
        """(backend, reason) for one copy; raises when the operator's choice cannot serve."""
        if self.backend != 'pv':
            if self.driver is not None and limits:
                return 'cgroup', '%s limit on %s' % (self.driver.controller,
                                                     limits[0].device)
            why = (str(self._unavailable or 'no cgroup driver') if self.driver is None
                   else 'neither %s nor %s is on a block device' % (src, dst))
            if self.backend == 'cgroup':
                raise ThrottleError('cgroup backend cannot throttle %s -> %s: %s'
                                    % (src, dst, why))
        else:
            why = 'backend pv chosen by the operator'
        if not (pipe_command() and shutil.which('pv')):
            why += ', and the pv fallback is not available (install pv and this ' \
                'package\'s %s)' % PIPE_COMMAND
        elif not pipe_rate(bps, limits):
            why += ', and only IOPS limits apply, which the pv fallback cannot enforce ' \
                '(set volume_copy_read_bps_limit or volume_copy_write_bps_limit too)'
        else:
            return 'pv', why
        if self.allow_unthrottled:
            return 'none', why + '; unthrottled copies are allowed'
        raise ThrottleError('cannot throttle %s -> %s: %s' % (src, dst, why))

    @contextlib.contextmanager
    def copy(self, src: str, dst: str, bps_limit: int,
             volume_id: Optional[str] = None,
             total_bytes: Optional[int] = None) -> Iterator[ActiveCopy]:
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
        limits = device_limits(src_dev, dst_dev, bps_limit, self.static)
        if not bps_limit and not limits:
            # No rate configured, and the static per-direction limits meet no block device.
            backend, reason = 'none', 'no rate configured and no limit applies to its devices'
        else:
            try:
                backend, reason = self._choose_backend(src, dst, limits, bps_limit)
            except ThrottleError:
                if self.budget:
                    self.budget.release(copy_id)
                raise
        copy = ActiveCopy(
            id=copy_id, src=src, dst=dst, src_dev=src_dev, dst_dev=dst_dev,
            bps_limit=bps_limit, backend=backend, reason=reason, prefix=[],
            limits=limits if backend == 'cgroup' else [], volume_id=volume_id,
            total_bytes=total_bytes, requested_bps=requested, budget_bps=budget_bps)
        with contextlib.ExitStack() as stack:
            if self.budget:  # last: when the copy and its entry are gone, or it failed
                stack.callback(self.budget.release, copy_id)
            if backend == 'cgroup':
                stack.enter_context(self._leaf(copy))
            elif backend == 'pv':
                copy.prefix = [pipe_command(), '--id', copy_id, '--rate',
                               str(pipe_rate(bps_limit, limits)),
                               '--state-dir', self.registry.directory, '--']
                # The pipeline removes its state when it ends; not when it was killed.
                stack.callback(pipeline.remove_state, self.registry.directory, copy_id)
            if self.host_bps_limit:  # after the entry is gone: the others get its share
                stack.callback(self._rebalance)
            self.registry.save(self._entry(copy))
            stack.callback(self._unregister, copy_id)
            with self._lock:
                self._copies[copy_id] = copy
            stack.callback(self._forget, copy_id)
            if self.host_bps_limit:
                self._rebalance()
            LOG.info('copy %s: %s -> %s at %s via %s (%s)', copy_id, src, dst,
                     format_rate(bps_limit), backend, reason)
            stack.push(functools.partial(self._record_end, copy))  # first, leaf still there
            yield copy

    @contextlib.contextmanager
    def _leaf(self, copy: ActiveCopy) -> Iterator[None]:
        driver = self.driver
        assert driver is not None
        driver.create_leaf(copy.id, copy.limits)
        try:
            copy.prefix = driver.prefix(copy.id)
            yield
        finally:
            killed = driver.remove_leaf(copy.id, self.grace)
            if killed:
                LOG.warning('copy %s: killed leftover processes %s before removing its '
                            'cgroup', copy.id, killed)

    def _record_end(self, copy: ActiveCopy, exc_type: Any, *exc: Any) -> None:
        """A volume's progress must read 100% (or failed) after its entry is gone."""
        if copy.volume_id:
            try:
                progress.record_finished(self.registry, self._entry(copy), exc_type is None)
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

    def _entry(self, copy: ActiveCopy) -> Entry:
        driver = self.driver if copy.backend == 'cgroup' else None
        return Entry(
            id=copy.id, owner_pid=os.getpid(), owner_start=self._owner_start,
            src=copy.src, dst=copy.dst,
            src_dev=copy.src_dev.majmin if copy.src_dev else None,
            dst_dev=copy.dst_dev.majmin if copy.dst_dev else None,
            src_via_file=bool(copy.src_dev and copy.src_dev.via_file),
            dst_via_file=bool(copy.dst_dev and copy.dst_dev.via_file),
            bps_limit=copy.bps_limit, backend=copy.backend, reason=copy.reason,
            started=copy.started, volume_id=copy.volume_id,
            cgroup=('%s:%s/%s' % (driver.controller, driver.parent, copy.id)
                    if driver else None),
            mountpoint=driver.mountpoint if driver else None,
            total_bytes=copy.total_bytes,
            extra=dict(relimit.policy_extra(copy.requested_bps, self.host_bps_limit,
                                            self.static), budget_bps=copy.budget_bps))

    def active(self) -> List[ActiveCopy]:
        with self._lock:
            return list(self._copies.values())

    def find(self, ident: str) -> ActiveCopy:
        """An active copy by copy id or volume id."""
        with self._lock:
            for copy in self._copies.values():
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
        self._sync(relimit.rebalance(self.registry))

    def _sync(self, entries: List[Entry]) -> None:
        """Mirror rates that relimit put in force (the registry is the source of truth)."""
        with self._lock:
            for entry in entries:
                copy = self._copies.get(entry.id)
                if copy is None:
                    continue
                copy.requested_bps = int(entry.extra.get('requested_bps', copy.requested_bps))
                copy.bps_limit = entry.bps_limit
                copy.budget_bps = entry.extra.get('budget_bps')
                if copy.backend == 'cgroup':
                    copy.limits = device_limits(copy.src_dev, copy.dst_dev, copy.bps_limit,
                                                self.static)

    def _local_rates(self) -> Dict[str, int]:
        """What each throttled copy of this process could use without the budget: its
        own limit within the host cap (0 = unlimited). From the registry, so that a
        set-limit from the CLI counts."""
        entries = [e for e in self.registry.entries()
                   if e.owner_pid == os.getpid() and e.backend in ('cgroup', 'pv')]
        return fair_shares({e.id: int(e.extra.get('requested_bps', e.bps_limit))
                            for e in entries}, self.host_bps_limit)

    def _apply_budget(self, shares: Dict[str, Optional[int]]) -> List[str]:
        """Put budget shares in force (None: the local rate); the copies it found."""
        entries = relimit.rebalance(self.registry, budgets=shares)
        self._sync(entries)
        return [e.id for e in entries if e.id in shares]

    def set_limit(self, ident: str, bps_limit: int) -> ActiveCopy:
        """Change a running copy's rate (by copy id or volume id) as the CLI does; it is
        in force at once, within this process's host-wide cap."""
        copy = self.find(ident)
        self._sync([relimit.set_limit(copy.id, bps_limit, self.registry)])
        LOG.info('copy %s: limit changed to %s', copy.id, format_rate(copy.bps_limit))
        return copy
