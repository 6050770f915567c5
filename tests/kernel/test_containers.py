"""cinder-volume in a container (Kolla, OpenStack-Helm): private cgroup namespace, or a
read-only /sys/fs/cgroup. VM lane (pure v2), plain mode.

The test plays the container runtime: a cgroup for the container, ``unshare -C -m`` (its
own cgroup namespace rooted there, cgroup2 mounted inside as runtimes do), a process
sitting in the namespace root like a container's init; then the CLI in it, as an operator
runs it with ``docker exec``. Oracles read the host's view of the cgroups.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.scratch import MiB, fill_random, io_wbytes as wbytes, majmin, sha256_prefix
from tests.scratch import read_text as read

pytestmark = [pytest.mark.vm, pytest.mark.kernel]

CLI = os.path.join(os.path.dirname(sys.executable), 'cinder-cgroup-throttle')
RATE = 4 * MiB  # as in tests/systemd: one emulated vCPU keeps up under a loaded host
SIZE = 24 * MiB


@pytest.fixture
def container(scratch):
    """A cgroup for the container, with io and memory for its children, as runtimes set it
    up; everything in it killed and removed afterwards."""
    root = '/sys/fs/cgroup'
    enabled = read(os.path.join(root, 'cgroup.subtree_control')).split()
    for controller in ('io', 'memory'):
        if controller not in enabled:
            with open(os.path.join(root, 'cgroup.subtree_control'), 'w') as f:
                f.write('+' + controller)
    path = os.path.join(root, 'cct-ns-%d' % os.getpid())
    os.mkdir(path)

    def remove():
        for dirpath, _dirs, _files in os.walk(path, topdown=False):
            for pid in read(os.path.join(dirpath, 'cgroup.procs')).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for dirpath, _dirs, _files in os.walk(path, topdown=False):
            os.rmdir(dirpath)
    scratch.defer('remove ' + path, remove)
    return path


def in_namespace(container: str, script: str) -> subprocess.Popen:
    """``script`` (sh) in the container's cgroup and its own cgroup and mount namespaces."""
    return subprocess.Popen(
        ['sh', '-c', 'echo $$ > %s/cgroup.procs && exec unshare -C -m sh -c "$0"' % container,
         script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_and_copy(container: str, src: str, dst: str,
                   check_may_fail: bool = False) -> subprocess.Popen:
    """A process in the namespace root (the container's init), the namespace's own cgroup2,
    then check and a copy, as `docker exec` runs them."""
    return in_namespace(container, 'sleep 600 >/dev/null 2>&1 & '
                        'umount /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup && '
                        '%s check %s exec %s copy %s %s --limit %d --size %d'
                        % (CLI, ';' if check_may_fail else '&&', CLI, src, dst, RATE, SIZE))


def test_private_cgroupns_moves_its_processes_into_a_leaf(scratch, container):
    src, dst = scratch.loop(40), scratch.loop(40)
    digest = fill_random(src, SIZE)
    proc = check_and_copy(container, src, dst)
    copies = os.path.join(container, 'cinder-volume-copy')
    busy = []
    deadline = time.monotonic() + 300
    while not busy and proc.poll() is None and time.monotonic() < deadline:
        leaves = [os.path.join(copies, n) for n in (
            os.listdir(copies) if os.path.isdir(copies) else []) if n.startswith('copy-')]
        busy = [leaf for leaf in leaves if read(os.path.join(leaf, 'cgroup.procs'))]
        time.sleep(0.05)
    assert busy, proc.communicate()
    leaf = busy[0]
    # the container's processes left its root; the copy runs in a leaf beside them
    assert read(os.path.join(container, 'cgroup.procs')).split() == []
    assert len(read(os.path.join(container, 'main', 'cgroup.procs')).split()) >= 2
    assert 'wbps=%d' % RATE in read(os.path.join(leaf, 'io.max'))
    # from the copy's first written bytes on: starting dd under emulation takes a second
    while proc.poll() is None and wbytes(leaf, majmin(dst)) < MiB:
        time.sleep(0.05)
    t0, before = time.monotonic(), wbytes(leaf, majmin(dst))
    time.sleep(2.0)
    rate = (wbytes(leaf, majmin(dst)) - before) / (time.monotonic() - t0)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    print(out)
    print('private cgroupns: io.stat rate/limit %.3f' % (rate / RATE))
    assert 0.9 * RATE <= rate <= 1.03 * RATE
    assert 'this process: v2-cgroupns' in out
    assert re.search(r'backend cgroup', out), out
    assert sha256_prefix(dst, SIZE) == digest
    assert not os.path.exists(leaf)


def test_read_only_cgroupfs_selects_pv_and_says_why(scratch):
    src, dst = scratch.loop(40), scratch.loop(40)
    digest = fill_random(src, SIZE)
    proc = subprocess.run(
        ['unshare', '-m', 'sh', '-c', 'mount -o remount,ro,bind /sys/fs/cgroup && %s check && '
         'exec %s copy %s %s --limit %d --size %d' % (CLI, CLI, src, dst, RATE, SIZE)],
        capture_output=True, text=True, timeout=300)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reason = 'cgroup2 at /sys/fs/cgroup is mounted read-only'
    assert 'this process: read-only: ' + reason in proc.stdout
    assert 'throttling works: pv fallback only' in proc.stdout
    # the copy's warning names the reason, and the copy says which backend ran it
    assert 'cgroup throttling unavailable: ' + reason in proc.stderr
    assert 'backend pv' in proc.stdout
    assert sha256_prefix(dst, SIZE) == digest


def test_failed_move_out_of_the_namespace_root_is_one_clear_reason(scratch, container):
    """The kernel refuses to move the container's processes into ``main``: a threaded
    cgroup beside it makes the container's cgroup a threaded domain and ``main`` "domain
    invalid", which cannot hold processes. check names that reason, the copy warns with it
    and still runs throttled, by pv; nothing is left in the container's cgroup tree."""
    threaded = os.path.join(container, 'threads')
    os.mkdir(threaded)
    scratch.defer('remove ' + threaded, lambda: os.path.isdir(threaded) and os.rmdir(threaded))
    with open(os.path.join(threaded, 'cgroup.type'), 'w') as f:
        f.write('threaded')
    os.mkdir(os.path.join(container, 'main'))
    assert read(os.path.join(container, 'main', 'cgroup.type')).strip() == 'domain invalid'
    src, dst = scratch.loop(40), scratch.loop(40)
    digest = fill_random(src, SIZE)
    proc = check_and_copy(container, src, dst, check_may_fail=True)
    out, err = proc.communicate(timeout=300)
    print(out, err)
    reason = 'must move to /sys/fs/cgroup/main first, which failed: '
    assert reason in out, out  # check
    assert proc.returncode == 0, out + err
    assert 'cgroup throttling unavailable: ' in err and reason in err, err
    assert 'backend pv' in out
    assert sha256_prefix(dst, SIZE) == digest

    def cgroups(path):
        return sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
    assert cgroups(container) == ['main', 'threads'] and cgroups(
        os.path.join(container, 'main')) == []
