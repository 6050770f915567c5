"""The executor: the one place that decides how root's steps run, and both executors doing
real cgroup work (the privsep one through a real daemon, as a non-root service does;
tests/unit/test_rootwrap_filters.py runs it through the real cinder-rootwrap too)."""
from __future__ import annotations

import os
import sys

import pytest

from cinder_cgroup_throttle import privileged
from cinder_cgroup_throttle.cgroups import DeviceLimit
from cinder_cgroup_throttle.devices import BlockDevice

MiB = 2**20
BIN = os.path.dirname(sys.executable)
PIPE = 'cinder-cgroup-throttle-pipe'
LEAF = 'copy-%d-00c0ffee' % os.getpid()


def test_the_effective_uid_decides():
    assert privileged.executor() is privileged.ROOT  # the suite runs as root
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child reports through the pipe)
        try:
            os.close(read)
            os.setegid(65534)
            os.seteuid(65534)
            os.write(write, privileged.executor().name.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        name = f.read()
    os.waitpid(pid, 0)
    assert name == 'privsep'


@pytest.mark.parametrize('path, root, service', [
    ('/usr/sbin:/usr/bin:/sbin:/bin', os.path.join(BIN, PIPE), PIPE),
    (BIN + ':/usr/bin:/bin', PIPE, PIPE),
], ids=['venv bin not on PATH', 'on PATH'])
def test_the_pipe_wrapper_is_named_as_each_caller_must(monkeypatch, path, root, service):
    """Root runs it directly (by path when PATH misses it); a service runs it through
    rootwrap, whose filters match the bare name and whose exec_dirs find it."""
    assert os.access(os.path.join(BIN, PIPE), os.X_OK), 'tools/bootstrap.sh installs it'
    monkeypatch.setenv('PATH', path)
    assert privileged.ROOT.pipe_command() == root
    assert privileged.PRIVSEP.pipe_command() == service


def test_how_names_the_route_into_root():
    assert privileged.ROOT.how() == 'directly as root'
    how = privileged.PRIVSEP.how()
    assert how.startswith('through ') and how.endswith(' privsep-helper'), how


@pytest.fixture
def daemon(monkeypatch):
    """Our privsep daemon, started without a root helper (we are root), stopped after."""
    from oslo_privsep import priv_context

    from cinder_cgroup_throttle import privsep
    privsep.default.stop()
    monkeypatch.setattr(priv_context, '_HELPER_COMMAND_PREFIX',
                        ['env', 'PATH=%s:%s' % (BIN, os.environ['PATH'])])
    yield privsep.default
    privsep.default.stop()


def limit_file(parent: str, leaf: str) -> str:
    if os.path.isdir('/sys/fs/cgroup/blkio'):
        return os.path.join('/sys/fs/cgroup/blkio', parent, leaf,
                            'blkio.throttle.write_bps_device')
    return os.path.join('/sys/fs/cgroup', parent, leaf, 'io.max')


@pytest.mark.kernel
@pytest.mark.parametrize('name', ['root', 'privsep'])
def test_both_executors_create_limit_and_remove_a_leaf(scratch, cgroup_parent, daemon,
                                                       name):
    executor = {'root': privileged.ROOT, 'privsep': privileged.PRIVSEP}[name]
    rdev = os.stat(scratch.loop(8)).st_rdev
    disk = BlockDevice(os.major(rdev), os.minor(rdev), 'loop')
    driver = executor.driver(cgroup_parent)
    assert (type(driver).__name__ == 'PrivilegedDriver') == (name == 'privsep')
    driver.create_leaf(LEAF, [DeviceLimit(disk, wbps=3 * MiB)])
    try:
        for bps in (3 * MiB, 5 * MiB):
            if bps != 3 * MiB:
                driver.write_limits(LEAF, [DeviceLimit(disk, wbps=bps)])
            with open(limit_file(cgroup_parent, LEAF)) as f:
                line, = f.read().splitlines()
            assert line.split()[0] == disk.majmin and str(bps) in line.split()[1:3], line
    finally:
        assert driver.remove_leaf(LEAF, grace=1) == []
    assert not os.path.exists(os.path.dirname(limit_file(cgroup_parent, LEAF)))
    # Only the privsep executor needed the daemon.
    assert (daemon.channel is not None) == (name == 'privsep')
