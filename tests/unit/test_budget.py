"""The copy budget's shares, configuration, and what the CLI shows of it (real etcd)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from oslo_config import cfg

from cinder_cgroup_throttle import budget, opts, policy
from cinder_cgroup_throttle.exception import ThrottleError

MiB = 1 << 20


def test_shares_are_max_min_over_every_host():
    members = {'a:1': {'budget_bps': 30, 'copies': {'c1': 0, 'c2': 4}},
               'b:2': {'budget_bps': 30, 'copies': {'c3': 20}}}
    # c2 can use 4 only: the 26 left are split between c1 (no own limit) and c3.
    assert budget.backend_shares(members, 30) == {'c1': 13, 'c2': 4, 'c3': 13}
    assert sum(budget.backend_shares(members, 30).values()) == 30
    assert budget.backend_shares({'a:1': {'copies': {'c1': 5}}}, 30) == {'c1': 5}


def test_strictest_budget_wins():
    members = {'a:1': {'budget_bps': 30}, 'b:2': {'budget_bps': 10}, 'c:3': {}}
    assert budget.effective_budget(members, 40) == 10


def test_config_checks_the_url():
    with pytest.raises(ThrottleError, match="etcd3\\+http.*not 'file:///var/lib/cinder'"):
        budget.BudgetConfig(url='file:///var/lib/cinder', group='b', bps_limit=1)
    with pytest.raises(ThrottleError, match='budget > 0'):
        budget.BudgetConfig(url='etcd3+http://h:2379', group='b', bps_limit=0)
    c = budget.BudgetConfig(url='etcd3+https://h:2379?timeout=7&ca_cert=/c', group='b',
                            bps_limit=1, lease_ttl=5)
    assert c.coordinator_url() == ('etcd3+https://h:2379?timeout=7&ca_cert=%2Fc'
                                   '&membership_timeout=3')  # 5 - poll 0.5 - 1
    assert budget.redact('etcd3+http://u:pw@h:1') == 'etcd3+http://u:***@h:1'


def _conf(tmp_path, text):
    conf = cfg.ConfigOpts()
    path = tmp_path / 'cinder.conf'
    path.write_text(text)
    conf.register_opts([cfg.StrOpt('backend_url')], group='coordination')
    conf.register_opts([cfg.StrOpt('host', default='node-7')])
    conf([], default_config_files=[str(path)])
    return conf


def test_budget_from_cinder_conf(tmp_path):
    conf = _conf(tmp_path, '[coordination]\nbackend_url = etcd3+http://10.0.0.1:2379\n'
                           '[copy_budget]\nenabled = true\nlease_ttl = 6\n'
                           '[lvm-1]\nvolume_copy_backend_bps_limit = 100Mi\n'
                           '[lvm-2]\nvolume_copy_bps_limit = 1\n')
    one = policy.load_config(conf, 'lvm-1').budget
    assert one == budget.BudgetConfig(url='etcd3+http://10.0.0.1:2379', group='lvm-1',
                                      bps_limit=100 * MiB, host='node-7', lease_ttl=6)
    assert policy.load_config(conf, 'lvm-2').budget is None  # no budget for this one


def test_budget_disabled_or_misconfigured(tmp_path):
    conf = _conf(tmp_path, '[backend_defaults]\nvolume_copy_backend_bps_limit = 1Mi\n')
    assert policy.load_config(conf, 'lvm-1').budget is None  # not enabled
    conf = _conf(tmp_path, '[copy_budget]\nenabled = true\n'
                           '[lvm-1]\nvolume_copy_backend_bps_limit = 1Mi\n')
    with pytest.raises(ThrottleError, match='coordination URL'):
        policy.load_config(conf, 'lvm-1')  # neither our URL nor [coordination]'s


def test_options_listed_for_the_generator():
    groups = dict(opts.list_opts())
    assert {o.name for o in groups['copy_budget']} >= {'enabled', 'backend_url',
                                                       'lease_ttl', 'poll_interval'}


def _cli(state_dir, *argv):
    return subprocess.run([sys.executable, '-m', 'cinder_cgroup_throttle.cli',
                           '--state-dir', state_dir, '--cgroup-name', 'cct-test-%d' % os.getpid()]
                          + list(argv),
                          capture_output=True, text=True, timeout=60)


def test_status_and_check_show_the_budget(etcd, tmp_path):
    state = str(tmp_path / 'state')
    demands = {'copy-1-0000abcd': 8 * MiB}
    config = budget.BudgetConfig(url=etcd.url, group='lvm-1', bps_limit=4 * MiB,
                                 host='node-a', lease_ttl=4, poll_interval=0.2)
    b = budget.CopyBudget(config, lambda: demands, lambda shares: list(shares), state)
    b.start()
    try:
        deadline = time.monotonic() + 10
        while not b.reachable:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        out = _cli(state, 'status')
        assert out.returncode == 0, out.stderr
        assert 'budget lvm-1: 4.00 MiB/s shared through ' + etcd.url in out.stdout
        row = [line.split() for line in out.stdout.splitlines() if 'copy-1-0000abcd' in line]
        assert row and row[0][0] == 'node-a' and row[0][-2:] == ['4.00', 'MiB/s']
        check = _cli(state, 'check')
        assert 'copy budget lvm-1: coordination at %s reachable (1 hosts)' % etcd.url \
            in check.stdout, check.stdout
        etcd.stop()
        check = _cli(state, 'check')
        assert check.returncode == 1
        assert 'copy budget lvm-1: coordination at %s unreachable' % etcd.url in check.stdout
        out = _cli(state, 'status')
        assert 'unreachable' in out.stdout and out.returncode == 0
    finally:
        b.stop()
    assert not os.path.exists(os.path.join(state, 'budget-%d.json' % os.getpid()))
