"""A copy budget per storage backend, shared by every cinder-volume host through tooz.

Hosts that serve one backend join one tooz group (etcd3 driver over etcd3gw, the stack
Cinder uses for its distributed locks). Each host is a member whose lease-bound key holds
its capabilities: the copies it runs and what each could use on its own (its *local* rate:
its own limit, within this host's cap). Every host reads the group, computes the same
max-min fair shares of the budget over all copies of the backend (``sharing.fair_shares``)
and applies the shares of its own copies through the registry (``relimit.rebalance``); a
copy never runs above its local rate, and what a low local rate leaves is split among the
others.

Faults: when etcd cannot be reached, this host's copies go back to their local rates at
once (logged once per outage) and keep running; the background thread reconnects and
restores the shares. A host that dies stops refreshing its lease; etcd deletes its key
when the lease expires, and the others take over its share. Hosts that still see etcd
keep counting an unreachable host's copies until its lease expires, and by then it runs
at its local rates: the sum stays within the budget plus the unreachable hosts' local
rates.

The thread is a ``threading.Thread`` and waits on ``threading.Event``: under eventlet's
monkey patching (cinder-volume) both are green, as are tooz's executor and the sockets of
etcd3gw's HTTP client.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import urllib.parse
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from cinder_cgroup_throttle.exception import ThrottleError
from cinder_cgroup_throttle.sharing import fair_shares
from cinder_cgroup_throttle.statefiles import BUDGET_NAME, StateDir
from cinder_cgroup_throttle.units import format_rate

LOG = logging.getLogger(__name__)

SCHEMES = ('etcd3+http', 'etcd3+https')
#: This process's budget, for ``cinder-cgroup-throttle status``/``check``.
STATE_FILE = 'budget-%d.json'  # statefiles.BUDGET_NAME
_GROUP_PREFIX = 'cinder-copy-budget.'
PENDING_MAX = 30.0  # seconds from admit() to the copy's registry entry, at most

#: local rate of each own copy (0 = unlimited); budget share of each (None = local) ->
#: the copies it was applied to
Demands = Callable[[], Dict[str, int]]
Apply = Callable[[Dict[str, Optional[int]]], Iterable[str]]


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """One backend's shared budget, from the backend section and ``[copy_budget]``."""

    url: str
    group: str
    bps_limit: int
    host: str = dataclasses.field(default_factory=socket.gethostname)
    lease_ttl: int = 10
    poll_interval: float = 0.5
    timeout: int = 2  # seconds per etcd request (the tooz driver takes whole seconds)

    def __post_init__(self) -> None:
        scheme = urllib.parse.urlsplit(self.url).scheme
        if scheme not in SCHEMES:
            raise ThrottleError('the copy budget needs an etcd3+http:// or etcd3+https:// '
                                'coordination URL, not %r' % redact(self.url))
        if self.bps_limit <= 0 or not self.group:
            raise ThrottleError('a copy budget needs a backend name and a budget > 0')

    @property
    def etcd_lease_ttl(self) -> int:
        """The etcd lease behind ``lease_ttl``: etcd revokes an expired lease within
        0.5 s and the other hosts notice at their next poll, which must both fall within
        ``lease_ttl`` of a host's death (etcd's shortest lease is 2 s)."""
        return max(2, int(self.lease_ttl - self.poll_interval - 1.0))

    def coordinator_url(self) -> str:
        """The URL with our lease TTL and request timeout, unless the URL sets them."""
        parts = urllib.parse.urlsplit(self.url)
        query = urllib.parse.parse_qs(parts.query)
        query.setdefault('membership_timeout', [str(self.etcd_lease_ttl)])
        query.setdefault('timeout', [str(self.timeout)])
        return parts._replace(query=urllib.parse.urlencode(query, doseq=True)).geturl()


def redact(url: str) -> str:
    """``url`` without a password, for logs and status."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = '%s:***@%s' % (parts.username, parts.netloc.rpartition('@')[2])
    return parts._replace(netloc=netloc).geturl()


def group_id(backend: str) -> bytes:
    return (_GROUP_PREFIX + backend).encode()


def effective_budget(members: Dict[str, Dict[str, Any]], own: int) -> int:
    """The smallest budget any member configured: hosts that disagree still all stay
    within the strictest one, and all compute the same shares."""
    return min([own] + [int(m.get('budget_bps') or 0) for m in members.values()
                        if int(m.get('budget_bps') or 0) > 0])


def backend_shares(members: Dict[str, Dict[str, Any]], budget: int) -> Dict[str, int]:
    """Max-min fair shares of ``budget`` over the copies of every member."""
    demands: Dict[str, int] = {}
    for caps in members.values():
        for copy_id, local in (caps.get('copies') or {}).items():
            demands[str(copy_id)] = int(local)
    return fair_shares(demands, budget)


def connect(config: BudgetConfig, member: str) -> Any:
    """A started tooz coordinator (its own lease) in the backend's group; raises tooz
    errors when etcd cannot be reached."""
    from tooz import coordination
    coord = coordination.get_coordinator(config.coordinator_url(), member.encode())
    coord.start(start_heart=False)
    try:
        coord.create_group(group_id(config.group)).get()
    except coordination.GroupAlreadyExist:
        pass
    except Exception:
        _stop_quietly(coord)
        raise
    return coord


def read_members(coord: Any, backend: str) -> Dict[str, Dict[str, Any]]:
    """Members of the backend's group and their capabilities."""
    from tooz import coordination
    try:
        found = coord.get_members_with_capabilities(group_id(backend)).get()
    except coordination.GroupNotCreated:
        return {}
    return {m.decode(): (caps if isinstance(caps, dict) else {}) for m, caps in found.items()}


def why(exc: BaseException) -> str:
    """What went wrong, in one line: tooz's connection errors often have an empty message
    and carry etcd3gw's or requests' error as their cause."""
    detail = str(exc) or getattr(exc, 'detail_text', None)  # etcd3gw keeps it there
    text = '%s: %s' % (type(exc).__name__, detail) if detail else type(exc).__name__
    cause = exc.__cause__ or getattr(exc, 'cause', None)
    if cause is not None and cause is not exc:
        text += ' (%s)' % why(cause)
    return text[:300]


def _stop_quietly(coord: Any) -> None:
    try:
        coord.stop()
    except Exception as exc:  # etcd unreachable: the lease expires on its own
        LOG.debug('copy budget: stopping the coordinator: %s', exc)


def _unreachable_errors() -> tuple:
    """What tooz and etcd3gw raise when etcd cannot be reached or answers badly (the
    driver's start and heartbeat let etcd3gw's and requests' errors through)."""
    import requests
    from etcd3gw import exceptions as etcd_exc
    from tooz import coordination
    return (coordination.ToozError, etcd_exc.Etcd3Exception,
            requests.exceptions.RequestException, OSError)


class CopyBudget:
    """This process's part of one backend's budget.

    ``demands()`` returns the local rate of each active copy of this process (its own
    limit within the host cap; 0 = unlimited); ``apply(shares)`` puts budget shares in
    force (None: back to the local rate). The manager provides both.
    """

    def __init__(self, config: BudgetConfig, demands: Demands, apply: Apply,
                 state_dir: Optional[str] = None) -> None:
        self.config = config
        self.member = '%s:%d' % (config.host, os.getpid())
        self._demands = demands
        self._apply = apply
        self._state_dir = state_dir
        self._lock = threading.Lock()  # one coordinator call at a time
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._coord: Any = None
        self._published: Optional[Dict[str, int]] = None
        # Admitted copies whose registry entry is not saved yet: (local rate, when).
        self._pending: Dict[str, Tuple[int, float]] = {}
        self._applied: Dict[str, Optional[int]] = {}
        self._reachable: Optional[bool] = None  # unknown until the first attempt
        self._last_beat = 0.0
        self._thread: Optional[threading.Thread] = None
        self.budget = config.bps_limit

    # -- the manager's hooks ---------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name='copy-budget', daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.timeout * 3)
        with self._lock:
            if self._coord is not None:
                try:  # leave now rather than at the lease's expiry
                    self._coord.leave_group(group_id(self.config.group)).get()
                except Exception as exc:
                    LOG.debug('copy budget: leave: %s', exc)
                _stop_quietly(self._coord)
                self._coord = None
        self._remove_state()

    def admit(self, copy_id: str, local_bps: int) -> Optional[int]:
        """Announce a starting copy and return its budget share (None: etcd is not
        reachable, the copy runs at its local rate). The shares of this process's other
        copies are updated too; other hosts follow within their poll interval."""
        self._pending[copy_id] = (local_bps, time.monotonic())
        demands = self._current()
        self._wake.set()  # poll while copies run
        if self._reachable is False:
            return None
        shares = self._sync(demands)
        return None if shares is None else shares.get(copy_id)

    def release(self, copy_id: str) -> None:
        """A copy of this process ended (after its registry entry was removed)."""
        self._applied.pop(copy_id, None)
        self._pending.pop(copy_id, None)
        if self._reachable:
            self._sync(self._current())
        self._wake.set()

    @property
    def reachable(self) -> bool:
        return bool(self._reachable)

    # -- coordination ----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                demands = self._current()
            except (OSError, ValueError) as exc:  # publish nothing rather than too little
                LOG.warning('copy budget: cannot read this host\'s copies: %s', exc)
                self._wake.wait(self.config.poll_interval)
                continue
            idle = not demands and self._coord is not None
            if not idle or time.monotonic() - self._last_beat >= self._beat_every():
                self._sync(demands)
            self._wake.wait(self.config.poll_interval if demands or self._coord is None
                            else self._beat_every())
            self._wake.clear()

    def _current(self) -> Dict[str, int]:
        """This process's copies: the registry's, and those admitted but not saved yet
        (a copy that failed before its entry was saved drops out after PENDING_MAX)."""
        demands = self._demands()
        now = time.monotonic()
        for cid, (local, since) in list(self._pending.items()):
            if cid in demands or now - since > PENDING_MAX:
                self._pending.pop(cid, None)
            else:
                demands[cid] = local
        return demands

    def _beat_every(self) -> float:
        return max(self.config.poll_interval, self.config.etcd_lease_ttl / 3.0)

    def _sync(self, demands: Dict[str, int]) -> Optional[Dict[str, int]]:
        """Publish ``demands``, read the group, apply this host's shares; None when etcd
        is unreachable (this host's copies are then back at their local rates)."""
        with self._lock:
            try:
                shares = self._exchange(demands)
            except Exception as exc:  # unreachable, or an answer we cannot use
                self._lost(exc, demands)
                return None
            own = {cid: shares.get(cid) for cid in demands}
            self._applied = {c: v for c, v in self._applied.items() if c in demands}
            changed = {cid: s for cid, s in own.items()
                       if cid not in self._applied or self._applied[cid] != s}
            if self._reachable is not True:
                LOG.log(logging.WARNING if self._reachable is False else logging.INFO,
                        'copy budget: coordination at %s reachable; backend %s shares '
                        '%s among %d copies', redact(self.config.url), self.config.group,
                        format_rate(self.budget), len(shares))
                self._reachable = True
                self._save_state()
        if changed:
            self._apply_quietly(changed)
        return shares

    def _exchange(self, demands: Dict[str, int]) -> Dict[str, int]:
        if self._coord is None:
            self._coord = connect(self.config, self.member)
            self._published = None
            self._last_beat = time.monotonic()
        elif time.monotonic() - self._last_beat >= self._beat_every():
            self._coord.heartbeat()  # a lease that expired is replaced by a new one
            self._last_beat = time.monotonic()
        caps = {'host': self.config.host, 'pid': os.getpid(),
                'budget_bps': self.config.bps_limit, 'copies': demands}
        if demands != self._published:
            self._publish(caps)
        members = read_members(self._coord, self.config.group)
        if (self.member not in members
                or members[self.member].get('copies') != demands):
            self._publish(caps)  # our key expired with a lease etcd lost, or is stale
            members[self.member] = caps
        self.budget = effective_budget(members, self.config.bps_limit)
        return backend_shares(members, self.budget)

    def _publish(self, caps: Dict[str, Any]) -> None:
        from tooz import coordination
        gid = group_id(self.config.group)
        try:
            self._coord.update_capabilities(gid, caps).get()
        except coordination.MemberNotJoined:
            try:
                self._coord.join_group(gid, caps).get()
            except coordination.GroupNotCreated:  # deleted meanwhile
                self._coord.create_group(gid).get()
                self._coord.join_group(gid, caps).get()
        self._published = dict(caps['copies'])

    def _lost(self, exc: BaseException, demands: Dict[str, int]) -> None:
        """etcd is not reachable: local rates now, for every copy of this process."""
        if self._reachable is not False:
            LOG.warning('copy budget: coordination at %s unreachable (%s); copies of '
                        'backend %s run at their local limits until it is back',
                        redact(self.config.url), why(exc), self.config.group)
            self._reachable = False
            self._save_state()
        local = {cid: None for cid in set(demands) | set(self._applied)
                 if self._applied.get(cid, 0) is not None}
        if local:
            self._apply_quietly(local)
        coord, self._coord = self._coord, None
        if coord is not None:  # after the copies are safe: its requests may time out
            _stop_quietly(coord)

    def _apply_quietly(self, shares: Dict[str, Optional[int]]) -> None:
        """Apply, and remember what is in force: a copy whose entry is not saved yet (it
        is starting) is tried again at the next poll."""
        try:
            done = set(self._apply(shares))
        except Exception as exc:  # never fail a copy or the thread over a re-limit
            LOG.warning('copy budget: cannot apply shares %s: %s', shares, exc)
            return
        for cid, share in shares.items():
            if cid in done:
                self._applied[cid] = share
            else:
                self._applied.pop(cid, None)

    # -- state for the CLI -----------------------------------------------------------
    def _save_state(self) -> None:
        """What the CLI needs to find this budget (a dead process's file goes with
        ``cleanup``)."""
        if not self._state_dir:
            return
        files = StateDir(self._state_dir)
        try:
            files.makedirs()
            files.write_json(STATE_FILE % os.getpid(), {
                'url': redact(self.config.url), 'group': self.config.group,
                'budget_bps': self.config.bps_limit, 'member': self.member,
                'pid': os.getpid(), 'reachable': bool(self._reachable), 'since': time.time()})
        except (OSError, ThrottleError) as exc:
            LOG.warning('copy budget: cannot write its state for the CLI: %s', exc)

    def _remove_state(self) -> None:
        if self._state_dir:
            try:
                StateDir(self._state_dir).remove(STATE_FILE % os.getpid())
            except (OSError, ThrottleError) as exc:
                LOG.debug('copy budget: cannot remove its state: %s', exc)


# -- what the CLI shows ------------------------------------------------------------------
def local_states(state_dir: str) -> List[Dict[str, Any]]:
    """Budgets of the live processes using ``state_dir`` (their state files, read as
    data from an untrusted writer: bounded, no links, every field type-checked)."""
    from cinder_cgroup_throttle.registry import process_alive
    files = StateDir(state_dir)
    found = []
    for name in files.names():
        match = BUDGET_NAME.match(name)
        if not match:
            continue
        try:
            data = files.read_json(name)
        except (OSError, ThrottleError) as exc:
            LOG.warning('copy budget state %s: %s', name, exc)
            continue
        if (type(data.get('pid')) is int and data['pid'] == int(match.group(1))
                and all(type(data.get(k)) is str for k in ('url', 'group'))
                and type(data.get('budget_bps')) is int and data['budget_bps'] > 0
                and process_alive(data['pid'], None)):
            found.append(data)
    return found


def probe(url: str, backend: str, timeout: int = 2) -> Dict[str, Dict[str, Any]]:
    """The members of ``backend``'s group as etcd has them now; raises ThrottleError
    naming the URL when coordination is not reachable."""
    config = BudgetConfig(url=url, group=backend, bps_limit=1, timeout=timeout)
    try:
        coord = connect(config, 'cli-%s-%d' % (socket.gethostname(), os.getpid()))
    except _unreachable_errors() as exc:
        raise ThrottleError('coordination at %s unreachable: %s' % (redact(url), why(exc)))
    try:
        return read_members(coord, backend)
    except _unreachable_errors() as exc:
        raise ThrottleError('coordination at %s: %s' % (redact(url), why(exc)))
    finally:
        _stop_quietly(coord)


def views(state_dir: str, timeout: int = 2) -> List[Dict[str, Any]]:
    """Each budget used by a live process of ``state_dir``, as etcd has it now: the
    budget, and every host of the backend with its copies (local rate, share); or why
    coordination is not reachable."""
    found = []
    for state in local_states(state_dir):
        view: Dict[str, Any] = {'group': state['group'], 'url': state['url'],
                                'budget_bps': state['budget_bps'], 'member': state.get(
                                    'member'), 'reachable': False, 'error': None,
                                'hosts': []}
        try:
            members = probe(state['url'], state['group'], timeout)
        except ThrottleError as exc:
            view['error'] = str(exc)
            found.append(view)
            continue
        budget = effective_budget(members, state['budget_bps'])
        shares = backend_shares(members, budget)
        view.update(reachable=True, budget_bps=budget, hosts=[
            {'member': member, 'host': caps.get('host'), 'pid': caps.get('pid'),
             'copies': [{'id': cid, 'local_bps': local, 'share_bps': shares.get(cid)}
                        for cid, local in sorted((caps.get('copies') or {}).items())]}
            for member, caps in sorted(members.items())])
        found.append(view)
    return found
