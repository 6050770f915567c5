"""Each limits rule, measured on real throttled copies (bytes verified, rates 0.97-1.03).

* volume metadata lowers a copy's rate; user metadata cannot raise it, admin metadata can;
  an invalid value is ignored and the operator's rate applies;
* a host-wide cap is shared: three copies get ~cap/3 each, the two left ~cap/2;
* a re-limit mid-copy, from another process (the CLI) and from Python, changes the rate
  within 1 s.

Rates are least-squares slopes of the kernel's byte counters, sampled by the test itself
(tests/scratch.py: the copy's leaf cgroup in cgroupfs; the destination device's sectors for
the pv fallback) over the middle of each copy or a window in it, so neither process
start-up nor how busy the machine is counts; windows see >= 16 blocks.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List

import pytest

from cinder_cgroup_throttle import pipeline, policy, relimit
from cinder_cgroup_throttle.cinder_hook import PolicyThrottle, copying
from cinder_cgroup_throttle.privileged import PIPE_COMMAND
from cinder_cgroup_throttle.registry import Registry
from cinder_cgroup_throttle.sharing import StaticLimits
from tests.kernel.test_cgroup_copy import dd_argv
from tests.scratch import (LeafRateProbe, MiB, DeviceRateProbe, RateProbe, fill_random,
                           sha256_prefix, timed)

pytestmark = pytest.mark.kernel

OPERATOR = 8 * MiB
KEY = 'volume_copy_bps_limit'


LOW, HIGH = 0.97, 1.03


def assert_ratio(measured: float, expected: float, what: str, high: float = HIGH) -> None:
    ratio = measured / expected
    print('%s: achieved/limit %.3f' % (what, ratio))
    assert LOW <= ratio <= high, '%s: %.2f MiB/s, expected %.2f (ratio %.3f)' % (
        what, measured / MiB, expected / MiB, ratio)


@pytest.fixture
def make_throttle(cgroup_parent, state_dir):
    """PolicyThrottle as cinder_hook installs it, on this session's cgroup parent."""
    made: List[PolicyThrottle] = []

    def make(**kw) -> PolicyThrottle:
        config = policy.ThrottleConfig(**dict(dict(bps_limit=OPERATOR, backend='cgroup',
                                                   cgroup_name=cgroup_parent), **kw))
        throttle = PolicyThrottle(config)
        made.append(throttle)
        return throttle

    yield make
    for throttle in made:
        if throttle.manager.driver is None:  # pv backend
            continue
        leftovers = throttle.manager.driver.leaves()
        for leaf in leftovers:
            throttle.manager.driver.remove_leaf(leaf, grace=1)
        assert not leftovers, 'cgroups left behind: %s' % leftovers
    assert not Registry(state_dir).entries(), 'registry entries left behind'


def window_for(rate: float, bs: int = MiB) -> float:
    """Seconds of measuring that see >= 16 blocks: counters move a block at a time."""
    return max(2.0, 16 * bs / rate)


def window_rates(probe: RateProbe, seconds: float) -> Dict[str, float]:
    """Bytes/s of every counter the probe sees move in the next ``seconds``."""
    t0 = time.monotonic()
    time.sleep(seconds)
    t1 = time.monotonic()
    return {k: probe.window(k, t0, t1) for k, steps in probe.series.items()
            if len([t for t, _ in steps if t0 <= t <= t1]) >= 3}


def leaf_probe(throttle: PolicyThrottle) -> LeafRateProbe:
    """Samples the copy leaves under the throttle's cgroup parent, from cgroupfs."""
    return LeafRateProbe(throttle.config.cgroup_name)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, 'timed out waiting for ' + what
        time.sleep(0.02)


def copy_volume(throttle: PolicyThrottle, src: str, dst: str, size: int,
                volumes=(), bs: str = '1M') -> float:
    """One copy as Cinder runs it inside a volume-aware path; returns bytes/s."""
    with copying(*volumes):
        with throttle.subcommand(src, dst) as cmd:
            assert cmd['prefix'], 'copy was not throttled'
            return size / timed(dd_argv(cmd['prefix'], src, dst, size, bs))


def measured_copy(throttle: PolicyThrottle, src: str, dst: str, size: int,
                  volumes=()) -> float:
    """Like copy_volume, but the rate is the leaf's byte counter over 10-90 % of the copy."""
    with copying(*volumes), leaf_probe(throttle) as probe:
        with throttle.subcommand(src, dst) as cmd:
            (copy,) = throttle.manager.active()
            timed(dd_argv(cmd['prefix'], src, dst, size, '1M'))
    # The copy ran in what the probe watched. Its last block may end with the
    # process or leaf before the next sample; completeness is checked elsewhere.
    assert probe.total(copy.id) >= 0.9 * size, probe.series
    return probe.rate(copy.id)


@pytest.mark.parametrize('metadata, expected', [
    ({'metadata': {KEY: '4Mi'}}, 4 * MiB),                    # user lowers
    ({'metadata': {KEY: '32Mi'}}, OPERATOR),                  # user cannot raise
    ({'admin_metadata': {KEY: '16MiB/s'}}, 16 * MiB),         # admin can raise
    ({'admin_metadata': {KEY: '16Mi'}, 'metadata': {KEY: '6Mi'}}, 6 * MiB),
    ({'metadata': {KEY: 'fast please'}}, OPERATOR),           # invalid: ignored
], ids=['user-lowers', 'user-cannot-raise', 'admin-raises', 'user-lowers-admin',
        'invalid-ignored'])
def test_metadata_rate(scratch, make_throttle, caplog, metadata, expected):
    throttle = make_throttle()
    size = int(expected * window_for(expected) * 1.25) // MiB * MiB  # 80 %: >= 16 blocks
    src, dst = scratch.loop(size // MiB + 8), scratch.loop(size // MiB + 8)
    digest = fill_random(src, size)
    volume = dict({'id': 'vol-%s' % expected, 'metadata': {}, 'admin_metadata': {}},
                  **metadata)
    with caplog.at_level(logging.INFO, logger='cinder_cgroup_throttle.policy'):
        rate = measured_copy(throttle, src, dst, size, [volume])
    assert sha256_prefix(dst, size) == digest
    print('metadata %s: %.2f MiB/s (expected %.2f)' % (metadata, rate / MiB, expected / MiB))
    assert_ratio(rate, expected, 'metadata %s' % metadata)
    if 'fast please' in str(metadata) or '32Mi' in str(metadata):
        assert any(r.levelno == logging.WARNING for r in caplog.records), caplog.text


def test_host_cap_is_shared_fairly_and_rebalanced(scratch, make_throttle):
    cap = 12 * MiB
    # bps_limit 0 + a cap: Cinder's built-in behaviour (one total split across copies).
    throttle = make_throttle(bps_limit=0, host_bps_limit=cap)
    # A lasts past the three-copy window (4 s at cap/3), B and C past the two-copy one.
    sizes = [24 * MiB, 48 * MiB, 48 * MiB]
    pairs = [(scratch.loop(56), scratch.loop(56)) for _ in sizes]
    digests = [fill_random(src, size) for (src, _), size in zip(pairs, sizes)]
    errors: List[BaseException] = []

    def one(i: int) -> None:
        try:
            copy_volume(throttle, pairs[i][0], pairs[i][1], sizes[i],
                        [{'id': 'vol-%d' % i, 'metadata': {}}])
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    probe = leaf_probe(throttle).__enter__()
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(throttle.manager.active()) == 3, 'three active copies')
        time.sleep(0.5)
        three = window_rates(probe, window_for(cap / 3))
        limits = sorted(c.bps_limit for c in throttle.manager.active())
        threads[0].join(timeout=30)
        assert not threads[0].is_alive()
        time.sleep(0.5)
        two = window_rates(probe, window_for(cap / 2))
        limits_two = sorted(c.bps_limit for c in throttle.manager.active())
    finally:
        for t in threads:
            t.join(timeout=60)
        probe.__exit__()
    assert not errors, errors
    for (src, dst), digest, size in zip(pairs, digests, sizes):
        assert sha256_prefix(dst, size) == digest
    print('three copies: %s MiB/s (sum %.2f); two: %s MiB/s (sum %.2f)' % (
        ['%.2f' % (r / MiB) for r in three.values()], sum(three.values()) / MiB,
        ['%.2f' % (r / MiB) for r in two.values()], sum(two.values()) / MiB))
    assert limits == [cap // 3] * 3
    assert limits_two == [cap // 2] * 2
    assert len(three) == 3 and len(two) == 2
    for rate in three.values():
        assert_ratio(rate, cap / 3, 'one of three copies')
    for rate in two.values():
        assert_ratio(rate, cap / 2, 'one of two copies')
    assert_ratio(sum(three.values()), cap, 'aggregate of three')


def test_own_limit_below_fair_share_leaves_the_rest_to_others(scratch, make_throttle):
    """max-min fairness: a copy asking 2 MiB/s under a 12 MiB/s cap keeps 2; the other
    gets the remaining 10 rather than an equal 6."""
    throttle = make_throttle(bps_limit=0, host_bps_limit=12 * MiB)
    (a_src, a_dst), (b_src, b_dst) = [(scratch.loop(40), scratch.loop(40)) for _ in range(2)]
    fill_random(a_src, 8 * MiB)
    fill_random(b_src, 32 * MiB)
    slow = threading.Thread(target=copy_volume, args=(
        throttle, a_src, a_dst, 8 * MiB, [{'id': 'slow', 'metadata': {KEY: '2Mi'}}], '256K'))
    probe = leaf_probe(throttle).__enter__()
    slow.start()
    try:
        wait_for(lambda: len(throttle.manager.active()) == 1, 'the slow copy')
        with copying({'id': 'fast', 'metadata': {}}):
            with throttle.subcommand(b_src, b_dst) as cmd:
                proc = subprocess.Popen(dd_argv(cmd['prefix'], b_src, b_dst, 32 * MiB, '1M'),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                try:
                    time.sleep(0.5)
                    rates = window_rates(probe, window_for(2 * MiB, 256 * 1024))
                    active = throttle.manager.active()
                    limits = {c.volume_id: c.bps_limit for c in active}
                    rates = {c.volume_id: rates[c.id] for c in active}
                finally:
                    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        slow.join(timeout=60)
        probe.__exit__()
    print('cap 12 MiB/s, one copy asks 2 MiB/s: %s MiB/s'
          % {k: round(v / MiB, 2) for k, v in rates.items()})
    assert limits == {'slow': 2 * MiB, 'fast': 10 * MiB}
    assert_ratio(rates['slow'], 2 * MiB, 'the copy asking 2 MiB/s')
    # 10 MiB/s in 1 MiB writes is one bio per 100 ms throttle slice: blk-throttle lets
    # 1.02-1.03 of it through (measured), the kernel's granularity, not the throttle's.
    assert_ratio(rates['fast'], 10 * MiB, 'the copy without own limit', high=1.05)


def cli() -> List[str]:
    """The console script of the environment running the tests."""
    exe = os.path.join(os.path.dirname(sys.executable), 'cinder-cgroup-throttle')
    return [exe if os.path.exists(exe) else shutil.which('cinder-cgroup-throttle')]


@contextlib.contextmanager
def running_copy(scratch, throttle, volume_id: str, mib: int):
    """A 1M-block dd of volume ``volume_id`` running under ``throttle``; yields (dd, its
    ActiveCopy, destination); checks dd's status and the bytes once the copy ends."""
    src, dst = scratch.loop(mib + 8), scratch.loop(mib + 8)
    size = mib * MiB
    digest = fill_random(src, size)
    with copying({'id': volume_id, 'metadata': {}}):
        with throttle.subcommand(src, dst) as cmd:
            proc = subprocess.Popen(dd_argv(cmd['prefix'], src, dst, size, '1M'),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                yield proc, throttle.manager.find(volume_id), dst
            finally:
                assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert sha256_prefix(dst, size) == digest


def test_relimit_mid_copy_from_cli_and_python(scratch, make_throttle, state_dir):
    throttle = make_throttle()
    # Long enough for every window even when the CLI starts slowly (seconds under the VM
    # lane's emulation); sped up once measured.
    volume = {'id': 'c0ffee00-0000-4000-8000-000000000001'}
    with leaf_probe(throttle) as probe, \
            running_copy(scratch, throttle, volume['id'], 256) as (proc, copy, dst):
        time.sleep(0.5)
        before = window_rates(probe, 3.0)[copy.id]
        assert proc.poll() is None, 'the copy ended inside a window'
        # Another process, by volume id, as an operator would.
        t0 = time.monotonic()
        out = subprocess.run(cli() + ['set-limit', volume['id'], '4Mi'],
                             capture_output=True, text=True, timeout=30)
        cli_seconds = time.monotonic() - t0
        assert out.returncode == 0, out.stderr
        entry = Registry(state_dir).load(copy.id)
        assert entry.bps_limit == 4 * MiB
        time.sleep(0.5)
        slower = window_rates(probe, window_for(4 * MiB))[copy.id]
        # This process, by copy id.
        t0 = time.monotonic()
        relimit.set_limit(copy.id, 16 * MiB, Registry(state_dir))
        applied_in = time.monotonic() - t0
        time.sleep(1.0)  # past the burst blk-throttle allows right after a raise
        faster = window_rates(probe, 2.0)[copy.id]
        assert proc.poll() is None, 'the copy ended inside a window'
        relimit.set_limit(copy.id, 2**30, Registry(state_dir))  # finish it
    print('re-limit: %.2f -> (CLI 4Mi, %.2f s with start-up) %.2f -> (Python 16Mi, applied '
          'in %.3f s) %.2f MiB/s'
          % (before / MiB, cli_seconds, slower / MiB, applied_in, faster / MiB))
    assert applied_in < 1.0
    assert_ratio(before, OPERATOR, 'before re-limit')
    assert_ratio(slower, 4 * MiB, 'after set-limit 4Mi from the CLI')
    assert_ratio(faster, 16 * MiB, 'after set_limit 16Mi from Python')


@pytest.fixture
def pv_on_path(monkeypatch):
    """The pv fallback's wrapper is a console script of the environment running us."""
    if not shutil.which(PIPE_COMMAND):
        monkeypatch.setenv('PATH', os.path.dirname(sys.executable) + os.pathsep
                           + os.environ.get('PATH', ''))
    for tool in (PIPE_COMMAND, 'pv'):  # tools/bootstrap.sh installs them
        assert shutil.which(tool), '%s is not installed' % tool


def test_relimit_mid_copy_pv_backend(scratch, make_throttle, state_dir, pv_on_path):
    throttle = make_throttle(backend='pv')
    volume = {'id': 'c0ffee00-0000-4000-8000-000000000002'}
    with running_copy(scratch, throttle, volume['id'], 160) as (proc, copy, dst), \
            DeviceRateProbe(dst) as probe:
        assert copy.backend == 'pv'
        wait_for(lambda: (pipeline.read_pipe_state(state_dir, copy.id) or {}).get('pids'),
                 'the pipeline')
        time.sleep(0.5)
        before = window_rates(probe, 3.0)[dst]
        t0 = time.monotonic()
        entry = relimit.set_limit(volume['id'], 16 * MiB, Registry(state_dir))
        applied_in = time.monotonic() - t0  # returns once pv -R is done
        time.sleep(0.5)
        after = window_rates(probe, 2.0)[dst]
        assert proc.poll() is None, 'the copy ended inside a window'
        relimit.set_limit(copy.id, 2**30, Registry(state_dir))  # finish it
    print('pv re-limit: %.2f -> (16Mi, applied in %.3f s) %.2f MiB/s'
          % (before / MiB, applied_in, after / MiB))
    assert entry.bps_limit == 16 * MiB
    assert applied_in < 1.0
    assert_ratio(before, OPERATOR, 'pv before re-limit')
    # pv catches up after a raise: measured 1.004-1.033.
    assert_ratio(after, 16 * MiB, 'pv after re-limit', high=1.05)


def test_static_read_iops_limit_is_applied(scratch, make_throttle):
    """volume_copy_read_iops_limit lands on the source device next to the rate."""
    throttle = make_throttle(bps_limit=0, static=StaticLimits(read_iops=64))
    src, dst = scratch.loop(40), scratch.loop(40)
    size, bs = 8 * MiB, 64 * 1024  # 128 direct reads, one bio each
    digest = fill_random(src, size)
    with throttle.subcommand(src, dst) as cmd:
        copy = throttle.manager.active()[0]
        assert [(lim.device.majmin, lim.riops, lim.rbps, lim.wbps) for lim in copy.limits] \
            == [(copy.src_dev.majmin, 64, 0, 0)]
        elapsed = timed(dd_argv(cmd['prefix'], src, dst, size, '64K'))
    assert sha256_prefix(dst, size) == digest
    iops = size / bs / elapsed
    print('read iops limit 64: measured %.1f reads/s' % iops)
    # dd's own clock; blk-throttle's iops slices give 0.956-0.966 of the limit (measured).
    assert 0.93 <= iops / 64 <= 1.03
