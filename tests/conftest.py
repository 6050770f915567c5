"""Shared fixtures. Kernel tests run on the real kernel (root, cgroups, loop devices).

In CI (``CI`` set) a skipped test marked ``kernel`` fails: a kernel case may only be skipped
where a developer's machine truly cannot run it.
"""
from __future__ import annotations

import os
import shutil

import pytest

from cinder_cgroup_throttle.cgroups import detect, get_driver
from cinder_cgroup_throttle.exception import CgroupUnavailable
from cinder_cgroup_throttle.manager import CopyManager
from cinder_cgroup_throttle.registry import Registry
from tests.etcd import Etcd
from tests.scratch import Scratch


def pytest_configure(config):
    for line in ('kernel: needs root, cgroups, loop devices and cgexec on the real kernel',
                 'cinder: drives the throttle through real Cinder 29 code',
                 'vm: needs what only the VM lane has (pure cgroup v2, device-mapper, '
                 'kernel-parsed partition tables)',
                 'systemd: needs the VM lane booted with systemd as PID 1 (--systemd)'):
        config.addinivalue_line('markers', line)


def pytest_runtest_setup(item):
    # tools/vm/run.sh sets CCT_VM=1 in the guest; elsewhere a vm test must be deselected.
    if item.get_closest_marker('vm') and os.environ.get('CCT_VM') != '1':
        pytest.fail('%s needs the VM lane: run it with tools/run-vm-tests.sh PYTHON, or '
                    'deselect it with -m "not vm"' % item.nodeid, pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (os.environ.get('CI') and report.skipped and item.get_closest_marker('kernel')
            and not hasattr(report, 'wasxfail')):
        report.outcome = 'failed'
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = 'kernel test skipped in CI (not allowed): %s' % (reason,)


def kernel_unavailable_reason() -> str:
    if os.geteuid() != 0:
        return 'needs root'
    for tool in ('cgexec', 'losetup', 'dd'):
        if not shutil.which(tool):
            return '%s is not installed (apt-get install cgroup-tools)' % tool
    try:
        get_driver('cct-probe', detect())
    except CgroupUnavailable as exc:
        return str(exc)
    return ''


@pytest.fixture(scope='session')
def kernel_ready() -> None:
    reason = kernel_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def scratch(kernel_ready):
    s = Scratch()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope='session')
def cgroup_parent(kernel_ready):
    """A parent cgroup private to this test session, removed at the end."""
    name = 'cct-test-%d' % os.getpid()
    driver = get_driver(name)
    yield name
    leftovers = driver.leaves()
    for leaf in leftovers:
        driver.remove_leaf(leaf, grace=1)
    try:
        os.rmdir(driver.parent_path)
    except FileNotFoundError:
        pass
    assert not leftovers, 'cgroups left behind: %s' % leftovers


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """A private registry directory, also seen by CLI subprocesses through the env."""
    path = str(tmp_path / 'state')
    monkeypatch.setenv('CINDER_CGROUP_THROTTLE_STATE_DIR', path)
    return path


@pytest.fixture
def manager(cgroup_parent, state_dir):
    """A cgroup-backend CopyManager on the session's parent; fails the test if a leaf or a
    registry entry is left behind."""
    mgr = CopyManager(cgroup_parent, grace=5, backend='cgroup', registry=Registry(state_dir))
    yield mgr
    leftovers = mgr.driver.leaves()
    for leaf in leftovers:
        mgr.driver.remove_leaf(leaf, grace=1)
    assert not leftovers, 'cgroups left behind: %s' % leftovers
    assert not mgr.registry.entries(), 'registry entries left behind'


@pytest.fixture
def etcd():
    """A private etcd (Debian's etcd-server) on loopback, removed at the end."""
    server = Etcd()
    try:
        server.start()
        yield server
    finally:
        server.close()
