"""The pv fallback, end to end: real pv < source | dd pipelines and qemu-img -r, bytes verified.

Copies go through CopyManager's prefix exactly as Cinder runs them (prefix + Cinder's argv),
so the wrapper's argv parsing, the registry and the published pipe state are all exercised.
"""
from __future__ import annotations

import compileall
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import cinder_cgroup_throttle
from cinder_cgroup_throttle import pipeline
from cinder_cgroup_throttle.exception import ThrottleError
from cinder_cgroup_throttle.manager import CopyManager
from cinder_cgroup_throttle.privileged import PIPE_COMMAND
from cinder_cgroup_throttle.registry import Registry
from cinder_cgroup_throttle.sharing import StaticLimits
from tests.kernel.test_cgroup_copy import dd_argv
from tests.scratch import (MiB, DeviceRateProbe, FileSizeProbe, dd_seconds, fill_random,
                           sha256_prefix, timed)

pytestmark = pytest.mark.kernel

RATE = 8 * MiB
# pv's own rate limiting, measured from the destination's bytes (a loop device's written
# sectors, a file's size) over 10-90 % of a copy.
LOW, HIGH = 0.97, 1.03
GiB = 1024 * MiB
#: CPU of a fallback copy against a bare dd's, loop -> loop: per byte (the copier does
#: what dd does; pv only passes tokens: measured 1.3x) and per copy (the wrapper's Python
#: start-up), bound as the issue's goal (3x) with the fixed cost separate.
CPU_PER_BYTE = 3.0
CPU_FIXED = 0.08


def assert_rate(ratio: float) -> None:
    assert LOW <= ratio <= HIGH, 'achieved/limit %.3f' % ratio


@pytest.fixture
def on_path(monkeypatch):
    """The wrapper is a console script of the environment running the tests."""
    if not shutil.which(PIPE_COMMAND):
        monkeypatch.setenv('PATH', os.path.dirname(sys.executable) + os.pathsep
                           + os.environ.get('PATH', ''))
    for tool in (PIPE_COMMAND, 'pv', 'qemu-img'):  # tools/bootstrap.sh installs them
        assert shutil.which(tool), '%s is not installed' % tool


def _manager(cgroup_parent, state_dir, backend):
    mgr = CopyManager(cgroup_parent, grace=5, backend=backend, registry=Registry(state_dir))
    yield mgr
    assert not mgr.registry.entries(), 'registry entries left behind'
    left = [n for n in os.listdir(state_dir) if not n.startswith('.')]
    assert not left, 'state files left behind: %s' % left


@pytest.fixture
def pv_manager(kernel_ready, on_path, cgroup_parent, state_dir):
    yield from _manager(cgroup_parent, state_dir, 'pv')


@pytest.fixture
def auto_manager(kernel_ready, on_path, cgroup_parent, state_dir):
    yield from _manager(cgroup_parent, state_dir, 'auto')


def start(argv):
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_state(state_dir, copy_id, key='pids', timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = pipeline.read_pipe_state(state_dir, copy_id)
        if state and state.get(key):
            return state
        time.sleep(0.05)
    raise AssertionError('pipeline of %s published no %s in %s' % (copy_id, key, state_dir))


def probe_for(dst):
    """The destination's own byte counter: sectors written to a block device, or the
    bytes allocated to a file (on tmpfs: as they are written)."""
    if os.path.realpath(dst).startswith('/dev/'):
        return DeviceRateProbe(dst)
    return FileSizeProbe(dst)


def pipeline_copy(argv, state_dir, copy_id, size, dst):
    """Run a pv-fallback copy; returns (its stderr, achieved bytes/s): the slope of the
    destination's byte counter over 10-90 % of ``size``, sampled here."""
    with probe_for(dst) as probe:
        proc = start(argv)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert probe.total(dst) >= 0.9 * size, probe.series
    return err, probe.rate(dst, total=size)


def test_tmpfs_file_to_tmpfs_file_falls_back_to_pv(scratch, auto_manager, state_dir):
    src_dir, dst_dir = scratch.tmpfs(64), scratch.tmpfs(64)
    src, dst = os.path.join(src_dir, 'src.img'), os.path.join(dst_dir, 'dst.img')
    size = 24 * MiB
    digest = fill_random(src, size)
    with auto_manager.copy(src, dst, RATE) as copy:
        assert copy.backend == 'pv', copy.reason
        assert copy.prefix[0] == PIPE_COMMAND
        err, rate = pipeline_copy(dd_argv(copy.prefix, src, dst, size, '1M',
                                          iflag_direct=False, oflag_direct=False),
                                  state_dir, copy.id, size, dst)
    assert sha256_prefix(dst, size) == digest
    assert os.path.getsize(dst) == size
    # The whole copy on the copier's clock (its dd-style report). The wrapper paces from
    # its own start, before the copier's: it sees at most that start-up (0.03-0.1 s) more
    # than the limit, never the ~0.1 s of pv's start lag less (0.97 before pacing from
    # the first byte).
    clock = size / dd_seconds(err) / RATE
    print('pv, tmpfs to tmpfs: achieved/limit %.3f (middle), %.4f (the copier\'s clock)'
          % (rate / RATE, clock))
    assert_rate(rate / RATE)
    assert 0.995 <= clock <= 1.04, clock


@pytest.mark.parametrize('ionice', [[], ['ionice', '-c3'], ['ionice', '-c2', '-n7']],
                         ids=['no-ionice', 'ionice-c3', 'ionice-c2-n7'])
def test_forced_pv_between_loop_devices(scratch, pv_manager, state_dir, ionice):
    src, dst = scratch.loop(48), scratch.loop(48)
    size = 24 * MiB
    digest = fill_random(src, size)
    with pv_manager.copy(src, dst, RATE) as copy:
        assert copy.backend == 'pv'
        argv = dd_argv(copy.prefix, src, dst, size, '1M')
        argv[len(copy.prefix):len(copy.prefix)] = ionice
        probe = DeviceRateProbe(dst).__enter__()
        proc = start(argv)
        state = wait_for_state(state_dir, copy.id)
        if ionice:  # the wrapper's class, so pv's and the copier thread's
            want = 'idle' if ionice[1] == '-c3' else 'best-effort: prio 7'
            wrapper = state['wrapper_pid']
            for pid in [state['pids']['pv']] + [int(t) for t in os.listdir(
                    '/proc/%d/task' % wrapper)]:
                out = subprocess.run(['ionice', '-p', str(pid)],
                                     capture_output=True, text=True).stdout
                assert want in out, '%s: %s' % (pid, out)
        mid = wait_for_state(state_dir, copy.id, key='bytes')
        assert 0 < mid['bytes'] < size and mid['total_bytes'] == size
        _, err = proc.communicate()
        probe.__exit__()
        assert proc.returncode == 0, err
    assert sha256_prefix(dst, size) == digest
    ratio = probe.rate(dst, total=size) / RATE
    print('pv between loop devices %s: achieved/limit %.3f' % (ionice, ratio))
    assert_rate(ratio)
    assert pipeline.read_pipe_state(state_dir, copy.id) is None


def test_rate_change_reaches_running_pipeline(scratch, pv_manager, state_dir):
    src, dst = scratch.loop(72), scratch.loop(72)
    size = 64 * MiB
    digest = fill_random(src, size)
    with pv_manager.copy(src, dst, 2 * MiB) as copy, DeviceRateProbe(dst) as probe:
        proc = start(dd_argv(copy.prefix, src, dst, size, '1M'))
        wait_for_state(state_dir, copy.id)
        # pv passes tokens on 0.1 s ticks: a block's end lands up to half a tick early or
        # late (measured 0.45/0.55 s apart at 2 MiB/s), 1.7 % of a 3 s window, 1 % of 5 s.
        time.sleep(5)
        before_end = time.monotonic()
        state = pipeline.request_rate(state_dir, copy.id, 16 * MiB)
        after_start = time.monotonic() + 0.5  # past pv's catch-up burst
        assert state['rate'] == 16 * MiB
        _, err = proc.communicate()
        assert proc.returncode == 0, err
    assert sha256_prefix(dst, size) == digest
    first = probe.series[dst][1][0]  # its first block written
    before = probe.window(dst, first, before_end)
    after = probe.window(dst, after_start, probe.series[dst][-1][0] - 0.2)
    print('pv re-limit 2 -> 16 MiB/s: achieved/limit %.3f -> %.3f'
          % (before / (2 * MiB), after / (16 * MiB)))
    assert_rate(before / (2 * MiB))
    assert 0.97 <= after / (16 * MiB) <= 1.05  # pv catches up after a raise (measured)


def test_a_stalled_copy_does_not_burst_to_catch_up(scratch, pv_manager, state_dir):
    """The wrapper stopped for 4 s while pv runs on, as when the machine or the destination
    stalls: pv keeps that credit (16 MiB here) and would hand it over at once. Afterwards
    the copy takes at most 1 s of its rate and a block at once, then its rate."""
    work = scratch.tmpfs(64)
    src, dst = os.path.join(work, 'src'), os.path.join(work, 'dst')
    size, rate = 32 * MiB, 4 * MiB
    digest = fill_random(src, size)
    with pv_manager.copy(src, dst, rate) as copy, FileSizeProbe(dst) as probe:
        proc = start(dd_argv(copy.prefix, src, dst, size, '1M', False, False))
        wrapper = wait_for_state(state_dir, copy.id)['wrapper_pid']
        time.sleep(1)
        os.kill(wrapper, signal.SIGSTOP)
        time.sleep(4)
        resumed = time.monotonic()
        os.kill(wrapper, signal.SIGCONT)
        _, err = proc.communicate()
        assert proc.returncode == 0, err
    assert sha256_prefix(dst, size) == digest
    steps = probe.series[dst]
    before = max(b for t, b in steps if t <= resumed)
    within = max(b for t, b in steps if t <= resumed + 1.0) - before
    print('after a 4 s stall at 4 MiB/s: %.1f MiB in the next second' % (within / MiB))
    assert within <= rate * 2 + 2 * MiB, within / MiB  # 16 MiB more when it caught up


def test_rate_requested_before_the_pipeline_starts_applies_at_start(scratch, pv_manager,
                                                                    state_dir):
    work = scratch.tmpfs(64)
    src, dst = os.path.join(work, 'src'), os.path.join(work, 'dst')
    size = 16 * MiB
    digest = fill_random(src, size)
    with pv_manager.copy(src, dst, 2 * MiB) as copy:
        assert pipeline.request_rate(state_dir, copy.id, 16 * MiB) is None
        elapsed = timed(dd_argv(copy.prefix, src, dst, size, '1M', False, False))
    assert sha256_prefix(dst, size) == digest
    assert elapsed < 4, elapsed  # 8 s at the rate of the prefix


def test_source_vanishing_fails_the_copy(scratch, pv_manager):
    work = scratch.tmpfs(32)
    src, dst = os.path.join(work, 'src'), os.path.join(work, 'dst')
    fill_random(src, 4 * MiB)
    with pv_manager.copy(src, dst, RATE) as copy:
        os.unlink(src)
        proc = subprocess.run(dd_argv(copy.prefix, src, dst, 4 * MiB, '1M', False, False),
                              capture_output=True, text=True)
    assert proc.returncode != 0
    assert src in proc.stderr and 'No such file or directory' in proc.stderr
    assert 'failed' in proc.stderr


def test_full_destination_fails_the_copy(scratch, pv_manager):
    src_dir, small = scratch.tmpfs(32), scratch.tmpfs(4)
    src, dst = os.path.join(src_dir, 'src'), os.path.join(small, 'dst')
    fill_random(src, 12 * MiB)
    with pv_manager.copy(src, dst, 32 * MiB) as copy:
        proc = subprocess.run(
            dd_argv(copy.prefix, src, dst, 12 * MiB, '1M', False, False) + ['conv=fdatasync'],
            capture_output=True, text=True)
    assert proc.returncode != 0, proc.stderr
    assert 'writing %s at byte ' % dst in proc.stderr, proc.stderr
    assert 'No space left on device' in proc.stderr


def test_killed_pv_fails_the_copy(scratch, pv_manager, state_dir):
    src, dst = scratch.loop(48), scratch.loop(48)
    size = 32 * MiB
    fill_random(src, size)
    with pv_manager.copy(src, dst, 4 * MiB) as copy:
        proc = start(dd_argv(copy.prefix, src, dst, size, '1M'))
        pids = wait_for_state(state_dir, copy.id)['pids']
        time.sleep(0.5)
        os.kill(pids['pv'], signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0, err
    assert 'pv (' in err and 'killed by SIGKILL' in err, err
    for pid in pids.values():  # no stage outlives the copy
        assert not os.path.exists('/proc/%d' % pid) or _zombie_or_gone(pid)


def test_killed_wrapper_takes_its_stages_along(scratch, pv_manager, state_dir):
    src, dst = scratch.loop(48), scratch.loop(48)
    fill_random(src, 32 * MiB)
    with pv_manager.copy(src, dst, 4 * MiB) as copy:
        proc = start(dd_argv(copy.prefix, src, dst, 32 * MiB, '1M'))
        pids = wait_for_state(state_dir, copy.id)['pids']
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(map(_zombie_or_gone, pids.values())):
            time.sleep(0.05)
        assert all(map(_zombie_or_gone, pids.values())), pids
    # SIGKILL gave the wrapper no chance to clean up: the copy's owner removed its state.
    assert pipeline.read_pipe_state(state_dir, copy.id) is None


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except FileNotFoundError:
        return True


def test_qemu_img_convert_raw_to_raw_uses_its_own_limit(scratch, pv_manager, state_dir):
    work = scratch.tmpfs(96)
    src, dst = os.path.join(work, 'src.raw'), os.path.join(work, 'dst.raw')
    size = 32 * MiB
    digest = fill_random(src, size)
    with pv_manager.copy(src, dst, RATE) as copy:
        _, rate = pipeline_copy(copy.prefix + ['qemu-img', 'convert', '-O', 'raw', '-f', 'raw',
                                               src, dst], state_dir, copy.id, size, dst)
    assert sha256_prefix(dst, size) == digest
    print('qemu-img -r: achieved/limit %.3f' % (rate / RATE))
    assert_rate(rate / RATE)


@pytest.mark.parametrize('command', [
    ['cat', '/etc/shadow'], ['sh', '-c', 'id'], ['pv', '/etc/shadow'],
    ['dd', 'if=/dev/zero', 'of=/dev/null', 'skip=1', 'bs=1M'],
    ['ionice', '-c3', 'sh'], ['qemu-img', 'info', '/etc/shadow']],
    ids=lambda c: '_'.join(c[:2]))
def test_other_commands_are_refused(scratch, pv_manager, command):
    work = scratch.tmpfs(8)
    with pv_manager.copy('/dev/zero', os.path.join(work, 'x'), RATE) as copy:
        proc = subprocess.run(copy.prefix + command, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(PIPE_COMMAND + ': ')
    assert not os.path.exists(os.path.join(work, 'x'))


def test_wrapper_found_beside_the_interpreter_when_not_on_path(scratch, cgroup_parent,
                                                               state_dir, monkeypatch):
    # cinder-volume installed in a venv whose bin directory is not on its PATH.
    beside = os.path.join(os.path.dirname(sys.executable), PIPE_COMMAND)
    assert os.access(beside, os.X_OK), '%s is not installed beside %s' % (
        PIPE_COMMAND, sys.executable)
    monkeypatch.setenv('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')
    assert shutil.which(PIPE_COMMAND) is None
    src = os.path.join(scratch.tmpfs(16), 'src.img')
    dst = os.path.join(scratch.tmpfs(16), 'dst.img')
    digest = fill_random(src, 4 * MiB)
    mgr = CopyManager(cgroup_parent, backend='auto', registry=Registry(state_dir))
    with mgr.copy(src, dst, RATE) as copy:
        assert copy.backend == 'pv'
        assert copy.prefix[0] == beside
        timed(dd_argv(copy.prefix, src, dst, 4 * MiB, '1M',
                      iflag_direct=False, oflag_direct=False))
    assert sha256_prefix(dst, 4 * MiB) == digest


@pytest.mark.parametrize('bps, static, expected', [
    (0, StaticLimits(write_bps=4 * MiB), 4 * MiB),
    (16 * MiB, StaticLimits(read_bps=4 * MiB, write_iops=1000), 4 * MiB),
], ids=['static-limit-only', 'static-limit-below-the-rate'])
def test_pv_enforces_the_lowest_bytes_limit(scratch, on_path, cgroup_parent, state_dir,
                                            bps, static, expected):
    """Operator's per-direction limits bind the pv fallback too (one rate: the lowest)."""
    mgr = CopyManager(cgroup_parent, backend='pv', registry=Registry(state_dir),
                      static=static)
    src, dst = scratch.loop(32), scratch.loop(32)
    size = 16 * MiB
    digest = fill_random(src, size)
    with mgr.copy(src, dst, bps) as copy:
        assert copy.prefix[copy.prefix.index('--rate') + 1] == str(expected)
        err, rate = pipeline_copy(dd_argv(copy.prefix, src, dst, size, '1M'), state_dir,
                                  copy.id, size, dst)
    assert sha256_prefix(dst, size) == digest
    copied = re.search(r'^(\d+) bytes .* copied', err, re.M)  # passed through
    assert copied and int(copied.group(1)) == size, err
    ratio = rate / expected
    print('pv, static %s, rate %d: achieved/limit %.3f' % (static, bps, ratio))
    assert_rate(ratio)


def test_pv_cannot_enforce_iops_only(scratch, on_path, cgroup_parent, state_dir):
    src, dst = scratch.loop(8), scratch.loop(8)
    static = StaticLimits(write_iops=100)
    mgr = CopyManager(cgroup_parent, backend='pv', registry=Registry(state_dir),
                      static=static)
    with pytest.raises(ThrottleError, match='only IOPS limits apply'):
        with mgr.copy(src, dst, 0):
            pass
    mgr = CopyManager(cgroup_parent, backend='pv', registry=Registry(state_dir),
                      static=static, allow_unthrottled=True)
    with mgr.copy(src, dst, 0) as copy:  # the operator's choice: unthrottled, and says why
        assert copy.backend == 'none' and 'IOPS' in copy.reason, copy.reason
    assert os.listdir(state_dir) in ([], ['.relimit.lock'])


def test_source_shorter_than_count_copies_what_there_is(scratch, pv_manager):
    """dd's own semantics: count= is a maximum, the copy is the source's bytes, checked."""
    work = scratch.tmpfs(32)
    src, dst = os.path.join(work, 'src'), os.path.join(work, 'dst')
    digest = fill_random(src, 3 * MiB)
    with pv_manager.copy(src, dst, 64 * MiB) as copy:
        proc = subprocess.run(dd_argv(copy.prefix, src, dst, 8 * MiB, '1M', False, False),
                              capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    copied = re.search(r'^(\d+) bytes .* copied', proc.stderr, re.M)
    assert copied and int(copied.group(1)) == 3 * MiB, proc.stderr
    assert os.path.getsize(dst) == 3 * MiB and sha256_prefix(dst, 3 * MiB) == digest


def test_unwritable_destination_fails_with_the_writers_error(scratch, pv_manager):
    work = scratch.tmpfs(16)
    src, dst = os.path.join(work, 'src'), os.path.join(work, 'missing', 'dst')
    fill_random(src, MiB)
    with pv_manager.copy(src, os.path.join(work, 'dst'), RATE) as copy:
        proc = subprocess.run(dd_argv(copy.prefix, src, dst, MiB, '1M', False, False),
                              capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert 'cannot open %s for writing: No such file or directory' % dst in proc.stderr


def _resident_bytes(path: str) -> int:
    """Page-cache bytes of ``path`` (util-linux fincore: mincore(2) over the file)."""
    out = subprocess.run(['fincore', '--bytes', '--noheadings', '--output', 'RES', path],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


def test_source_is_read_without_the_page_cache(scratch, pv_manager):
    """Cinder reads with O_DIRECT (no cache), and so does the copier."""
    assert shutil.which('fincore'), 'fincore (util-linux) is not installed'
    ext4 = scratch.mkfs_mount(scratch.loop(48), 'ext4')
    src, dst = os.path.join(ext4, 'src'), os.path.join(scratch.tmpfs(32), 'dst')
    size = 16 * MiB
    digest = fill_random(src, size)  # written, synced and dropped: nothing cached
    assert _resident_bytes(src) == 0
    with pv_manager.copy(src, dst, 64 * MiB) as copy:
        timed(dd_argv(copy.prefix, src, dst, size, '1M'))
    assert sha256_prefix(dst, size) == digest
    assert _resident_bytes(src) == 0


def _cpu_seconds(argv):
    """User + system CPU of a command and every process it waited for (wait4)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert os.waitstatus_to_exitcode(status) == 0, err
    return usage.ru_utime + usage.ru_stime


def test_cpu_per_byte_near_bare_dd(scratch, pv_manager):
    """Per byte, the fallback costs at most CPU_PER_BYTE times a bare dd of the same copy;
    per copy, at most CPU_FIXED seconds more. Measured side by side (interleaved,
    medians of 3), loop device to loop device with Cinder's flags, at two sizes: the
    slope is the per-byte cost, the intercept the fixed one (the wrapper's start)."""
    # Byte-compiled as an installed copy is: with PYTHONDONTWRITEBYTECODE (this project's
    # environments) every wrapper start would compile its modules again.
    compileall.compile_dir(os.path.dirname(cinder_cgroup_throttle.__file__), quiet=1)
    small, big = 32 * MiB, 256 * MiB
    src, dst = scratch.loop(264), scratch.loop(264)
    fill_random(src, big)
    cpu = {}
    for size in (small, big):
        bare, ours = [], []
        for _ in range(3):
            bare.append(_cpu_seconds(dd_argv([], src, dst, size, '1M')))
            with pv_manager.copy(src, dst, GiB) as copy:
                ours.append(_cpu_seconds(dd_argv(copy.prefix, src, dst, size, '1M')))
        cpu[size] = sorted(bare)[1], sorted(ours)[1]
    per_gib = [(cpu[big][i] - cpu[small][i]) / ((big - small) / GiB) for i in (0, 1)]
    fixed = [cpu[small][i] - per_gib[i] * small / GiB for i in (0, 1)]
    print('CPU per GiB: bare dd %.3f s, fallback %.3f s (%.1fx); fixed per copy: %.3f s, '
          '%.3f s; 256 MiB: %.3f s vs %.3f s (%.1fx)' % (
              per_gib[0], per_gib[1], per_gib[1] / per_gib[0], fixed[0], fixed[1],
              cpu[big][0], cpu[big][1], cpu[big][1] / cpu[big][0]))
    assert per_gib[1] <= CPU_PER_BYTE * per_gib[0], per_gib
    assert fixed[1] - fixed[0] <= CPU_FIXED, fixed
