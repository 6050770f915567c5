"""Change the rate of running copies, from the owning process or from any other (the CLI).

The registry is the single source of truth, so both kinds of caller agree: each entry
records what the copy asked for (``extra['requested_bps']``), the owner's host-wide cap
(``extra['host_bps_limit']``) and its static per-direction limits (``extra['static']``);
``bps_limit`` is the rate in force. Every change re-computes the fair shares of all copies
of that owner and applies the ones that moved, under an exclusive lock on the state
directory, so a re-limit from the CLI and a copy starting in cinder-volume never interleave.

Applying a rate is the copy's backend's (``CopyBackend.set_rate``, rebuilt from the entry):
the cgroup backend rewrites the leaf's limit files (the kernel applies a new limit to
in-flight I/O at once); the pv backend leaves a rate request next to the pipeline's state
(``pipeline.request_rate``), which the pipeline applies with ``pv -R PID -L RATE`` within
its 0.2 s poll, or at its start if it is not running yet.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import time
from typing import Dict, Iterator, List, Optional

from oslo_concurrency import lockutils

from cinder_cgroup_throttle import backends, privileged
from cinder_cgroup_throttle.exception import CopyNotFound, ThrottleError
from cinder_cgroup_throttle.registry import Entry, Registry
from cinder_cgroup_throttle.statefiles import COPY_ID
from cinder_cgroup_throttle.sharing import StaticLimits, fair_shares
from cinder_cgroup_throttle.units import format_rate

LOG = logging.getLogger(__name__)

LOCK_POLL = (0.001, 0.05)  # first and longest pause between attempts on the lock file


def policy_extra(requested_bps: int, host_bps_limit: int,
                 static: StaticLimits) -> Dict[str, object]:
    """What a new registry entry records so that any process can re-balance it."""
    return {'requested_bps': requested_bps, 'host_bps_limit': host_bps_limit,
            'static': dataclasses.asdict(static)}


@contextlib.contextmanager
def locked(registry: Registry) -> Iterator[None]:
    """Exclusive lock over re-balancing the copies of ``registry``, across processes.

    Never blocks the OS thread, so it is safe in an eventlet-patched cinder-volume (where
    a holder waits on a green subprocess or the privsep daemon): within the process an
    oslo.concurrency fair lock (first come, first served; green under eventlet), across
    processes a ``flock`` on the state directory's lock file taken with LOCK_NB and retried
    after a (green) sleep. lockutils' own external lock is not used: it opens the file for
    appending and follows a symbolic link, in a directory the service user can write,
    where root (the CLI) must do neither; ``open_lock`` opens it read-only and never
    through a link, so a lock file root created stays usable by a non-root cinder-volume.
    """
    with lockutils.lock('cinder-cgroup-throttle-relimit:' + registry.directory, fair=True):
        fd = registry.files.open_lock()  # never a link, a FIFO or a device
        try:
            delay = LOCK_POLL[0]
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                time.sleep(delay)
                delay = min(delay * 2, LOCK_POLL[1])
            yield
        finally:
            os.close(fd)


def apply(entry: Entry, bps: int, state_dir: str, executor: privileged.Executor) -> None:
    """Put ``bps`` in force for a running copy (``entry.bps_limit`` is the current rate),
    through its backend, as its owner would (``executor``)."""
    backends.for_entry(entry, executor, state_dir).set_rate(entry, bps)


def _rebalance_locked(registry: Registry, owner_pid: int, executor: privileged.Executor,
                      strict: Optional[str] = None) -> List[Entry]:
    """Apply the fair shares; a copy that cannot be re-limited keeps its rate and is only
    logged (a copy ending must not fail because another could not speed up), except
    ``strict``, the copy the caller asked about."""
    entries = [e for e in registry.entries() if e.owner_pid == owner_pid]
    if not entries:
        return []
    cap = max(int(e.extra.get('host_bps_limit') or 0) for e in entries)
    requested = {e.id: int(e.extra.get('requested_bps', e.bps_limit)) for e in entries}
    shares = fair_shares(requested, cap)
    for entry in entries:
        share = shares[entry.id]
        budget = int(entry.extra.get('budget_bps') or 0)  # the backend's shared budget
        if budget:
            share = min(share, budget) if share else budget
        if share != entry.bps_limit:
            try:
                apply(entry, share, registry.directory, executor)
            except (ThrottleError, OSError) as exc:
                if entry.id == strict:
                    raise
                LOG.warning('copy %s: cannot change its rate to %s: %s', entry.id,
                            format_rate(share), exc)
                continue
            LOG.info('copy %s: rate %s -> %s (asked %s, host cap %s, %d copies)', entry.id,
                     format_rate(entry.bps_limit), format_rate(share),
                     format_rate(requested[entry.id]) if requested[entry.id] else 'no limit',
                     format_rate(cap) if cap else 'none', len(entries))
            entry.bps_limit = share
            registry.save(entry)
    return entries


def rebalance(registry: Registry, owner_pid: Optional[int] = None,
              budgets: Optional[Dict[str, Optional[int]]] = None,
              executor: Optional[privileged.Executor] = None) -> List[Entry]:
    """Re-compute and apply the rates of every active copy of ``owner_pid`` (default:
    this process); call it after a copy of that owner started or ended. ``budgets``:
    new shares of the backend's budget by copy id (budget.py; None: no budget share).
    ``executor``: how root's steps run (default: this process's)."""
    with locked(registry):
        for copy_id, budget in (budgets or {}).items():
            entry = registry.load(copy_id)
            if entry is not None and entry.extra.get('budget_bps') != budget:
                entry.extra['budget_bps'] = budget
                registry.save(entry)
        return _rebalance_locked(registry, owner_pid or os.getpid(),
                                 executor or privileged.executor())


def find(ident: str, registry: Registry) -> Entry:
    """The active copy with copy id ``ident``, or the only one of volume ``ident``."""
    entry = registry.load(ident) if COPY_ID.match(ident) else None
    if entry is not None:
        return entry
    matches = [e for e in registry.entries() if e.volume_id == ident]
    if not matches:
        raise CopyNotFound('no active copy with id or volume id %r in %s'
                           % (ident, registry.directory))
    if len(matches) > 1:
        raise ThrottleError('volume %s has %d active copies (%s): give a copy id'
                            % (ident, len(matches), ', '.join(e.id for e in matches)))
    return matches[0]


def set_limit(ident: str, bps: int, registry: Registry,
              executor: Optional[privileged.Executor] = None) -> Entry:
    """Set the rate a running copy asks for; returns its entry with the rate now in force
    (lower than ``bps`` when the owner's host-wide cap gives it a smaller fair share).
    ``executor``: how root's steps run (default: this process's)."""
    if isinstance(bps, bool) or not isinstance(bps, int) or bps <= 0:
        raise ThrottleError('a running copy needs a rate > 0 bytes/s, not %r' % (bps,))
    with locked(registry):
        entry = find(ident, registry)
        if not entry.owner_alive():
            raise CopyNotFound('copy %s: its owner (pid %d) is gone'
                               % (entry.id, entry.owner_pid))
        entry.extra['requested_bps'] = bps
        registry.save(entry)
        for current in _rebalance_locked(registry, entry.owner_pid,
                                         executor or privileged.executor(), strict=entry.id):
            if current.id == entry.id:
                return current
    raise CopyNotFound('copy %s ended while being re-limited' % entry.id)
