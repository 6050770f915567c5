"""Each backend behind the one interface, and the selector's choice with its reason.

The cgroup backend works on the real kernel: a leaf made from an entry, re-limited and
measured by a backend rebuilt from the saved entry alone (as another process does), with
the kernel's own files and counters as the oracle.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from typing import Any, Optional

import pytest

from cinder_cgroup_throttle import backends
from cinder_cgroup_throttle.backends.cgroup import CgroupBackend
from cinder_cgroup_throttle.backends.none import NoneBackend
from cinder_cgroup_throttle.backends.pv import PvBackend
from cinder_cgroup_throttle.cgroups import DeviceLimit
from cinder_cgroup_throttle.devices import BlockDevice
from cinder_cgroup_throttle.exception import ThrottleError
from cinder_cgroup_throttle.privileged import ROOT
from cinder_cgroup_throttle.registry import Entry, Registry

MiB = 2**20
PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'cinder_cgroup_throttle')


def a_disk() -> str:
    """MAJ:MIN of some whole disk of this host."""
    for name in sorted(os.listdir('/sys/block')):
        with open('/sys/block/%s/dev' % name) as f:
            return f.read().strip()
    raise AssertionError('no block device in /sys/block')


def majmin(path: str) -> str:
    rdev = os.stat(path).st_rdev
    return '%d:%d' % (os.major(rdev), os.minor(rdev))


def device(text: str) -> BlockDevice:
    major, minor = (int(n) for n in text.split(':'))
    return BlockDevice(major, minor, text)


def an_entry(backend: str, dst_dev: Optional[str] = None, bps: int = 4 * MiB,
             static: Optional[dict] = None, **fields: Any) -> Entry:
    return Entry(id='copy-%d-%s' % (os.getpid(), secrets.token_hex(4)),
                 owner_pid=os.getpid(), owner_start=None, src='/dev/zero',
                 dst='/dev/x', src_dev=None, dst_dev=dst_dev, bps_limit=bps,
                 backend=backend, reason='test', started=time.time(),
                 extra={'requested_bps': bps, 'host_bps_limit': 0, 'static': static or {}},
                 **fields)


def leaf_dir(parent: str, leaf: str) -> str:
    if os.path.isdir('/sys/fs/cgroup/blkio'):
        return os.path.join('/sys/fs/cgroup/blkio', parent, leaf)
    return os.path.join('/sys/fs/cgroup', parent, leaf)


def write_limit(path: str, dev: str) -> int:
    """The write bytes/s limit on ``dev`` as the kernel shows it (0: none)."""
    v1 = os.path.join(path, 'blkio.throttle.write_bps_device')
    if os.path.exists(v1):
        with open(v1) as f:
            rows = [line.split() for line in f if line.startswith(dev + ' ')]
        return int(rows[0][1]) if rows else 0
    with open(os.path.join(path, 'io.max')) as f:
        found = re.search(r'^%s .*wbps=(\d+)' % re.escape(dev), f.read(), re.M)
    return int(found.group(1)) if found else 0


# -- the selector ---------------------------------------------------------------------------
def test_an_unknown_mode_is_refused(state_dir):
    with pytest.raises(ThrottleError, match=r'one of auto\|cgroup\|pv, not .cgexec.'):
        backends.Selector('cgexec', 'x', ROOT, state_dir)


def test_no_rate_and_no_limit_runs_unthrottled_and_says_why(state_dir):
    backend, why = backends.Selector('pv', 'x', ROOT, state_dir).choose('/a', '/b', 0, [])
    assert isinstance(backend, NoneBackend) and not backend.throttles
    assert why == 'no rate configured and no limit applies to its devices'


def test_pv_chosen_by_the_operator_says_so(state_dir):
    selector = backends.Selector('pv', 'x', ROOT, state_dir)
    assert selector.cgroup is None  # pv mode never looks for a cgroup
    backend, why = selector.choose('/a', '/b', MiB, [])
    assert isinstance(backend, PvBackend)
    assert why == 'backend pv chosen by the operator'


def test_iops_only_is_refused_by_pv_unless_unthrottled_copies_are_allowed(state_dir):
    limits = [DeviceLimit(device(a_disk()), wiops=100)]
    with pytest.raises(ThrottleError, match='only IOPS limits apply'):
        backends.Selector('pv', 'x', ROOT, state_dir).choose('/a', '/b', 0, limits)
    backend, why = backends.Selector('pv', 'x', ROOT, state_dir,
                                     allow_unthrottled=True).choose('/a', '/b', 0, limits)
    assert isinstance(backend, NoneBackend)
    assert why.endswith('; unthrottled copies are allowed') and 'IOPS' in why


@pytest.mark.kernel
def test_cgroup_mode_fails_where_no_side_is_a_block_device(cgroup_parent, state_dir):
    selector = backends.Selector('cgroup', cgroup_parent, ROOT, state_dir)
    with pytest.raises(ThrottleError, match='cgroup backend cannot throttle /a -> /b: '
                       'neither /a nor /b is on a block device'):
        selector.choose('/a', '/b', MiB, [])


@pytest.mark.kernel
def test_auto_chooses_the_cgroup_and_names_controller_and_disk(cgroup_parent, state_dir):
    selector = backends.Selector('auto', cgroup_parent, ROOT, state_dir)
    disk = a_disk()
    backend, why = selector.choose('/a', '/b', MiB, [DeviceLimit(device(disk), wbps=MiB)])
    assert isinstance(backend, CgroupBackend)
    controller = 'blkio' if os.path.isdir('/sys/fs/cgroup/blkio') else 'io'
    assert why == '%s limit on %s (%s)' % (controller, disk, disk)


# -- rebuilding from the record ---------------------------------------------------------------
def test_for_entry_rebuilds_pv_and_none(state_dir):
    assert isinstance(backends.for_entry(an_entry('pv'), ROOT, state_dir), PvBackend)
    assert isinstance(backends.for_entry(an_entry('none'), ROOT, state_dir), NoneBackend)


@pytest.mark.parametrize('cgroup, mountpoint, error', [
    ('blkio:p/copy-1-0123abcd', '/sys/fs/cgroup/blkio', 'not a copy leaf'),  # not its id
    (None, None, 'not a copy leaf'),
    ('blkio:p/ID', '/tmp', 'is not the mounted blkio cgroup hierarchy'),
    ('cpu:p/ID', '/sys/fs/cgroup/cpu', 'is not the mounted cpu cgroup hierarchy'),
])
def test_a_cgroup_entry_naming_anything_but_our_leaf_is_refused(state_dir, cgroup,
                                                                mountpoint, error):
    entry = an_entry('cgroup')
    entry.cgroup = cgroup.replace('ID', entry.id) if cgroup else None
    entry.mountpoint = mountpoint
    with pytest.raises(ThrottleError, match=error):
        backends.for_entry(entry, ROOT, state_dir)


@pytest.mark.kernel
def test_cgroup_backend_from_start_to_reclaim(scratch, cgroup_parent, state_dir):
    dst = scratch.loop(8)
    dev = majmin(dst)
    host = backends.host_cgroup(cgroup_parent, ROOT, state_dir)
    entry = an_entry('cgroup', dst_dev=dev, bps=4 * MiB)
    prefix = host.start(entry)
    path = leaf_dir(cgroup_parent, entry.id)
    try:
        assert prefix == ['cgexec', '-g', entry.cgroup]
        assert write_limit(path, dev) == 4 * MiB
        registry = Registry(state_dir)
        registry.save(entry)
        saved = registry.read(entry.id)  # another process knows only the record
        rebuilt = backends.for_entry(saved, ROOT, state_dir)
        rebuilt.set_rate(saved, 6 * MiB)
        assert write_limit(path, dev) == 6 * MiB
        saved.bps_limit = 6 * MiB
        assert [(lim.device.majmin, lim.wbps) for lim in rebuilt.limits(saved)] == [
            (dev, 6 * MiB)]
        subprocess.run(prefix + ['dd', 'if=/dev/zero', 'of=' + dst, 'bs=1M', 'count=2',
                                 'oflag=direct', 'status=none'], check=True)
        assert rebuilt.bytes_done(saved) == (2 * MiB, 'cgroup', [])  # leaf's counters
        gone, actions = rebuilt.reclaim(saved, dry_run=True)
        assert gone and [a.action for a in actions] == ['would remove']
        assert os.path.isdir(path)
        gone, actions = rebuilt.reclaim(saved, dry_run=False)
        assert gone and [a.action for a in actions] == ['removed']
        assert not os.path.exists(path)
    finally:
        host.stop(entry, grace=1)
    assert not os.path.exists(path)


@pytest.mark.kernel
def test_a_leaf_with_processes_is_kept_by_reclaim(scratch, cgroup_parent, state_dir):
    host = backends.host_cgroup(cgroup_parent, ROOT, state_dir)
    entry = an_entry('cgroup', dst_dev=majmin(scratch.loop(8)))
    sleeper = subprocess.Popen(host.start(entry) + ['sleep', '30'])
    try:
        deadline = time.monotonic() + 5
        while not host.driver.pids(entry.id) and time.monotonic() < deadline:
            time.sleep(0.01)
        gone, actions = host.reclaim(entry, dry_run=False)
        assert not gone and [a.action for a in actions] == ['kept']
        assert 'processes %d still run' % sleeper.pid in actions[0].reason
    finally:
        sleeper.kill()
        sleeper.wait()
        host.stop(entry, grace=1)
    assert not os.path.exists(leaf_dir(cgroup_parent, entry.id))


# -- pv and none ----------------------------------------------------------------------------
def test_pv_paces_at_the_lowest_bytes_limit_and_requests_rate_changes(state_dir):
    pv = PvBackend(ROOT, state_dir)
    entry = an_entry('pv', dst_dev=a_disk(), bps=8 * MiB, static={'write_bps': 4 * MiB})
    prefix = pv.start(entry)
    assert prefix[1:] == ['--id', entry.id, '--rate', str(4 * MiB), '--state-dir',
                          state_dir, '--']
    assert os.path.basename(prefix[0]) == 'cinder-cgroup-throttle-pipe'
    assert pv.limits(entry) == []  # a rate, no device limits
    Registry(state_dir).files.makedirs()
    pv.set_rate(entry, 2 * MiB)  # no pipeline yet: it applies the request as it starts
    request = os.path.join(state_dir, entry.id + '.rate')
    with open(request) as f:
        assert json.load(f) == {'rate': 2 * MiB}
    assert pv.bytes_done(entry) == (None, 'none', [])  # no pipeline state yet
    assert pv.reclaim(entry, dry_run=False) == (True, [])  # no pipeline runs on
    pv.stop(entry, grace=0)
    assert not os.path.exists(request)


def test_none_has_no_prefix_and_nothing_to_reclaim(state_dir):
    none = NoneBackend(ROOT, state_dir)
    entry = an_entry('none', bps=0)
    assert none.start(entry) == []
    assert none.reclaim(entry, dry_run=False) == (True, [])
    assert none.bytes_done(entry) == (None, 'none', [])


def test_backend_names_are_compared_only_in_backends():
    """Adding a backend must not mean editing string comparisons across the package."""
    pattern = re.compile(r"backend\s*(==|!=|not in|in)\s|'(cgroup|pv|none)'\s*(==|!=)")
    found = []
    for directory, _dirs, names in os.walk(PACKAGE):
        if os.path.basename(directory) == 'backends':
            continue
        for name in names:
            if name.endswith('.py'):
                with open(os.path.join(directory, name)) as f:
                    found += ['%s:%d' % (name, n) for n, line in enumerate(f, 1)
                              if pattern.search(line)]
    assert found == []
