"""Re-limit bookkeeping through the registry (copies whose backend needs no kernel)."""
from __future__ import annotations

import os
import time

import pytest

from cinder_cgroup_throttle import relimit
from cinder_cgroup_throttle.exception import CopyNotFound, ThrottleError
from cinder_cgroup_throttle.registry import Entry, Registry, process_start_time
from cinder_cgroup_throttle.sharing import StaticLimits

MiB = 2**20


def entry(n, bps, cap=0, volume=None, pid=None):
    pid = pid or os.getpid()
    return Entry(id='copy-%d-%08x' % (pid, n), owner_pid=pid,
                 owner_start=process_start_time(pid), src='/dev/zero', dst='/dev/null',
                 src_dev=None, dst_dev=None, bps_limit=bps, backend='none',
                 reason='test: nothing to throttle', started=time.time(), volume_id=volume,
                 extra=relimit.policy_extra(bps, cap, StaticLimits()))


@pytest.fixture
def registry(tmp_path):
    return Registry(str(tmp_path / 'state'))


def test_set_limit_by_copy_or_volume_id(registry):
    registry.save(entry(1, 8 * MiB, volume='vol-1'))
    assert relimit.set_limit('copy-%d-00000001' % os.getpid(), 4 * MiB,
                             registry).bps_limit == 4 * MiB
    updated = relimit.set_limit('vol-1', 2 * MiB, registry)
    assert updated.bps_limit == 2 * MiB
    saved = registry.load(updated.id)
    assert (saved.bps_limit, saved.extra['requested_bps']) == (2 * MiB, 2 * MiB)


def test_cap_rebalances_all_copies_of_the_owner(registry):
    cap = 12 * MiB
    for n in range(3):
        registry.save(entry(n, 0, cap))
    relimit.rebalance(registry)
    assert sorted(e.bps_limit for e in registry.entries()) == [4 * MiB] * 3
    # One copy asks for less than its share: the others share the rest.
    first = 'copy-%d-00000000' % os.getpid()
    assert relimit.set_limit(first, 2 * MiB, registry).bps_limit == 2 * MiB
    assert sorted(e.bps_limit for e in registry.entries()) == [2 * MiB, 5 * MiB, 5 * MiB]
    # Asking for more than the share gives the share.
    assert relimit.set_limit(first, 100 * MiB, registry).bps_limit == 4 * MiB
    registry.remove(first)
    relimit.rebalance(registry)
    assert sorted(e.bps_limit for e in registry.entries()) == [6 * MiB] * 2


def test_errors_name_what_was_wrong(registry):
    registry.save(entry(1, 8 * MiB, volume='twice'))
    registry.save(entry(2, 8 * MiB, volume='twice'))
    with pytest.raises(ThrottleError, match='2 active copies'):
        relimit.set_limit('twice', MiB, registry)
    with pytest.raises(CopyNotFound, match='nope'):
        relimit.set_limit('nope', MiB, registry)
    with pytest.raises(CopyNotFound):
        relimit.set_limit('../../etc/passwd', MiB, registry)
    for bad in (0, -1, True, '8Mi'):
        with pytest.raises(ThrottleError, match='rate > 0'):
            relimit.set_limit('copy-%d-00000001' % os.getpid(), bad, registry)


def test_copy_of_a_dead_owner_is_refused(registry):
    dead = entry(1, 8 * MiB)
    dead.owner_start = 1.0  # this pid, but a process that started long ago: gone
    registry.save(dead)
    with pytest.raises(CopyNotFound, match='owner'):
        relimit.set_limit(dead.id, MiB, registry)


def test_budget_share_lowers_the_local_rate_and_goes_away(registry):
    for n, bps in enumerate((8 * MiB, 0)):  # own limit 8 MiB/s; no own limit
        registry.save(entry(n, bps, cap=12 * MiB))
    ids = sorted(e.id for e in registry.entries())
    relimit.rebalance(registry)
    assert [registry.load(i).bps_limit for i in ids] == [6 * MiB, 6 * MiB]
    # Shares of the backend's budget (budget.py): the lower of local rate and share.
    relimit.rebalance(registry, budgets={ids[0]: 2 * MiB, ids[1]: 9 * MiB})
    assert [registry.load(i).bps_limit for i in ids] == [2 * MiB, 6 * MiB]
    # A re-limit keeps the budget share in force.
    assert relimit.set_limit(ids[0], 4 * MiB, registry).bps_limit == 2 * MiB
    # Coordination lost: back to the local rates.
    relimit.rebalance(registry, budgets={ids[0]: None, ids[1]: None})
    assert [registry.load(i).bps_limit for i in ids] == [4 * MiB, 8 * MiB]
