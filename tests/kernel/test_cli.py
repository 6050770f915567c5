"""The operator CLI, driven as a user drives it: separate processes, real copies.

Every test uses its own parent cgroup (``cct-test-cli-*``) and state directory, so copies
of other test sessions on this machine are never seen, cleaned or re-limited. Argument
errors are covered without the kernel in tests/unit/test_cli_args.py.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from typing import Callable, List

import psutil
import pytest

from cinder_cgroup_throttle.cgroups import get_driver
from tests.scratch import MiB, fill_random, sha256_prefix

pytestmark = pytest.mark.kernel

BIN = os.path.dirname(sys.executable)
# Under the VM lane's TCG emulation every CLI call takes 4-10 s instead of 0.5 s: copies
# there are made SLOW times longer so that the checks still happen while they run.
SLOW = 3 if os.environ.get('CCT_VM') else 1
PROG = 'cinder-cgroup-throttle'
SUMMARY = re.compile(r'copied .* = (?:(\d+\.\d+) of the .* limit|limit changed from .*) '
                     r'\(copy (copy-\d+-[0-9a-f]{8}), backend (\w+)')


def cli_argv() -> List[str]:
    script = os.path.join(BIN, PROG)
    if os.path.exists(script):
        return [script]
    return [sys.executable, '-m', 'cinder_cgroup_throttle.cli']


class Cli:
    """Runs the CLI with a private state dir and parent cgroup, as separate processes."""

    def __init__(self, state_dir: str, cgroup: str) -> None:
        self.state_dir, self.cgroup = state_dir, cgroup
        self.driver = get_driver(cgroup)
        # The pv fallback's wrapper is a console script next to the interpreter.
        self.env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get('PATH', ''))
        self.procs: List[subprocess.Popen] = []

    def argv(self, *args: str) -> List[str]:
        return cli_argv() + ['--state-dir', self.state_dir, '--cgroup-name', self.cgroup
                             ] + list(args)

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), capture_output=True, text=True,
                              env=self.env, timeout=timeout * SLOW)

    def start(self, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def status(self, interval: float = 0.2) -> dict:
        out = self.run('status', '--json', '--interval', str(interval))
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def wait_for(self, cond: Callable[[dict], bool], what: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout * SLOW
        while time.monotonic() < deadline:
            status = self.status()
            if cond(status):
                return status
            time.sleep(0.2)
        raise AssertionError('timed out waiting for %s; last status %s' % (what, status))

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:  # a failed test: let the CLI clean up (SIGTERM)
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.communicate(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.fixture
def cli(kernel_ready, tmp_path):
    c = Cli(str(tmp_path / 'state'), 'cct-test-cli-%d-%s' % (os.getpid(),
                                                             secrets.token_hex(3)))
    try:
        yield c
    finally:
        c.close()
        leftovers = c.driver.leaves()
        for leaf in leftovers:
            c.driver.remove_leaf(leaf, grace=1)
        if os.path.isdir(c.driver.parent_path):
            os.rmdir(c.driver.parent_path)
        assert not leftovers, 'cgroups left behind: %s' % leftovers


def copy_of(status: dict, proc: subprocess.Popen) -> dict:
    mine = [c for c in status['copies'] if c['owner_pid'] == proc.pid]
    assert len(mine) == 1, status
    return mine[0]


def running(proc: subprocess.Popen) -> Callable[[dict], bool]:
    def cond(status: dict) -> bool:
        mine = [c for c in status['copies'] if c['owner_pid'] == proc.pid]
        return bool(mine) and (mine[0]['progress']['bytes_done'] or 0) > 0
    return cond


def finish(proc: subprocess.Popen, timeout: float = 60):
    out, err = proc.communicate(timeout=timeout * SLOW)
    assert proc.returncode == 0, 'copy failed (%d): %s' % (proc.returncode, err)
    match = SUMMARY.search(out)
    assert match, out
    ratio = float(match.group(1)) if match.group(1) else None
    return ratio, match.group(2), match.group(3), out + err


def test_status_from_another_process_while_a_copy_runs(scratch, cli):
    size, rate = 32 * SLOW * MiB, 4 * MiB
    src, dst = scratch.loop(size // MiB), scratch.loop(size // MiB)
    digest = fill_random(src, size)
    proc = cli.start('copy', src, dst, '--limit', '4Mi', '--size', str(size),
                     '--volume-id', 'vol-1')
    first = copy_of(cli.wait_for(running(proc), 'the copy to make progress'), proc)
    assert re.match(r'^copy-%d-[0-9a-f]{8}$' % proc.pid, first['id'])
    assert (first['src'], first['dst'], first['backend']) == (src, dst, 'cgroup')
    assert first['bps_limit'] == rate and first['volume_id'] == 'vol-1'
    assert first['owner_alive'] is True
    assert first['progress']['total_bytes'] == size
    table = cli.run('status', '--interval', '1')
    assert table.returncode == 0, table.stderr
    print('\n' + table.stdout)  # the table the closing note quotes (pytest -s)
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:4] == ['ID', 'VOLUME', 'BACKEND', 'LIMIT']
    assert row.split()[:5] == [first['id'], 'vol-1', 'cgroup', '4.00', 'MiB/s']
    later = copy_of(cli.status(interval=2), proc)['progress']
    assert first['progress']['bytes_done'] < later['bytes_done'] <= size
    assert 0 < later['percent'] < 100 and later['eta_s'] > 0
    # The current rate over a 2 s window of 1 MiB blocks: generous bounds.
    assert 0.5 * rate <= later['rate_bps'] <= 1.5 * rate, later
    ratio, copy_id, backend, err = finish(proc)
    assert (copy_id, backend) == (first['id'], 'cgroup')
    assert 0.8 <= ratio <= 1.15, ratio
    assert '%' in err and 'ETA' in err  # the progress bar went to stderr
    assert sha256_prefix(dst, size) == digest
    assert cli.status() == {'copies': []}
    assert not os.path.exists(cli.driver.leaf_path(copy_id))


def _limit_text(cli: Cli, leaf: str) -> str:
    path = cli.driver.leaf_path(leaf)
    if cli.driver.controller == 'blkio':
        return open(os.path.join(path, 'blkio.throttle.write_bps_device')).read()
    return open(os.path.join(path, 'io.max')).read()


def _wait_empty(cli: Cli, leaf: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while cli.driver.pids(leaf):
        assert time.monotonic() < deadline, 'processes stay in %s' % leaf
        time.sleep(0.05)


def test_kill_9_then_cleanup_removes_only_the_dead_copys_leftovers(scratch, cli):
    size = 32 * SLOW * MiB  # at 1 MiB/s the live copy outlasts the checks below
    pairs = [(scratch.loop(size // MiB), scratch.loop(size // MiB)) for _ in range(2)]
    for src, _dst in pairs:
        fill_random(src, size)
    victim = cli.start('copy', pairs[0][0], pairs[0][1], '--limit', '1Mi', '--size', str(size))
    live = cli.start('copy', pairs[1][0], pairs[1][1], '--limit', '1Mi', '--size', str(size))
    dead_id = copy_of(cli.wait_for(running(victim), 'the first copy'), victim)['id']
    live_id = copy_of(cli.wait_for(running(live), 'the second copy'), live)['id']
    entry_file = lambda copy_id: os.path.join(cli.state_dir, copy_id + '.json')  # noqa: E731
    # Not ours: another tool's cgroup and a look-alike name, both process-free.
    foreign = [cli.driver.leaf_path(n) for n in ('other-tool', 'copy-1-zzzzzzzz')]
    for path in foreign:
        os.mkdir(path)
    try:
        os.kill(victim.pid, signal.SIGKILL)  # only the CLI: its dd dies with it
        victim.communicate()
        _wait_empty(cli, dead_id)
        status = cli.status()
        assert {c['id']: c['owner_alive'] for c in status['copies']} == {
            dead_id: False, live_id: True}
        dst_majmin = copy_of(status, live)['dst_dev']

        dry = cli.run('cleanup', '--dry-run')
        assert dry.returncode == 0, dry.stderr
        assert 'would remove cgroup   %s' % cli.driver.leaf_path(dead_id) in dry.stdout
        assert 'would remove registry %s' % dead_id in dry.stdout
        assert os.path.isdir(cli.driver.leaf_path(dead_id))
        assert os.path.exists(entry_file(dead_id))

        done = cli.run('cleanup')
        print('\n' + done.stdout)  # the output the closing note quotes (pytest -s)
        assert done.returncode == 0, done.stderr
        assert 'removed      cgroup   %s' % cli.driver.leaf_path(dead_id) in done.stdout
        assert 'removed      registry %s' % dead_id in done.stdout
        assert not os.path.exists(cli.driver.leaf_path(dead_id))  # and its limits with it
        assert not os.path.exists(entry_file(dead_id))
        assert live_id not in done.stdout
        # The live copy is untouched: leaf, limit, processes, entry.
        assert live.poll() is None and cli.driver.pids(live_id)
        limit = _limit_text(cli, live_id)
        assert (limit.split() == [dst_majmin, str(MiB)] if cli.driver.controller == 'blkio'
                else limit.startswith('%s rbps=max wbps=%d ' % (dst_majmin, MiB))), limit
        assert os.path.exists(entry_file(live_id))
        assert all(os.path.isdir(p) for p in foreign)
        assert cli.run('cleanup').stdout.startswith('nothing to clean up')
    finally:
        for path in foreign:
            os.rmdir(path)
    # An operator's plain kill (SIGTERM) is a clean stop: nothing is left to clean up.
    os.kill(live.pid, signal.SIGTERM)
    _out, err = live.communicate(timeout=30 * SLOW)
    assert live.returncode == 143 and 'terminated' in err and 'Traceback' not in err, err
    assert cli.status() == {'copies': []} and cli.driver.leaves() == []


def test_cleanup_keeps_a_dead_owners_cgroup_while_processes_run_in_it(cli):
    """An orphaned dd outliving its owner keeps its cgroup and its limit."""
    gone = subprocess.Popen(['true'])
    gone.wait()
    leaf = 'copy-%d-%s' % (gone.pid, secrets.token_hex(4))
    cli.driver.create_leaf(leaf)
    group = '%s:%s/%s' % (cli.driver.controller, cli.cgroup, leaf)
    orphan = subprocess.Popen(['cgexec', '-g', group, 'sleep', '60'])
    try:
        deadline = time.monotonic() + 5
        while not cli.driver.pids(leaf) and time.monotonic() < deadline:
            time.sleep(0.02)
        out = cli.run('cleanup')
        assert out.returncode == 0, out.stderr
        assert 'kept         cgroup   %s' % cli.driver.leaf_path(leaf) in out.stdout
        assert 'still run in it' in out.stdout
        assert cli.driver.pids(leaf) == [orphan.pid]
    finally:
        orphan.kill()
        orphan.wait()
    _wait_empty(cli, leaf)
    out = cli.run('cleanup')
    assert 'removed      cgroup   %s' % cli.driver.leaf_path(leaf) in out.stdout
    assert not os.path.exists(cli.driver.leaf_path(leaf))


def test_next_copy_cleans_up_after_a_killed_one(scratch, cli):
    size = 16 * SLOW * MiB
    src, dst = scratch.loop(size // MiB), scratch.loop(size // MiB)
    fill_random(src, size)
    victim = cli.start('copy', src, dst, '--limit', '2Mi', '--size', str(size))
    dead_id = copy_of(cli.wait_for(running(victim), 'the copy'), victim)['id']
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    _wait_empty(cli, dead_id)
    assert os.path.isdir(cli.driver.leaf_path(dead_id))
    # A new CopyManager (here: the next copy) cleans up at start.
    out = cli.run('copy', src, dst, '--limit', '64Mi', '--size', '1Mi')
    assert out.returncode == 0, out.stderr
    assert not os.path.exists(cli.driver.leaf_path(dead_id))
    assert cli.status() == {'copies': []}


def test_pv_fallback_progress_and_cleanup_after_kill_9(scratch, cli):
    size = 24 * SLOW * MiB
    src, dst = scratch.loop(size // MiB), scratch.loop(size // MiB)
    digest = fill_random(src, size)
    proc = cli.start('copy', src, dst, '--limit', '2Mi', '--size', str(size), '--backend', 'pv')
    first = copy_of(cli.wait_for(running(proc), 'the pv copy'), proc)
    assert first['backend'] == 'pv' and first['progress']['source'] == 'pv'
    later = copy_of(cli.status(interval=2), proc)['progress']
    assert first['progress']['bytes_done'] < later['bytes_done'] <= size
    assert 0.5 * 2 * MiB <= later['rate_bps'] <= 1.5 * 2 * MiB, later
    ratio, _copy_id, backend, _err = finish(proc)
    assert backend == 'pv' and 0.8 <= ratio <= 1.15, ratio
    assert sha256_prefix(dst, size) == digest

    victim = cli.start('copy', src, dst, '--limit', '2Mi', '--size', str(size), '--backend', 'pv')
    dead_id = copy_of(cli.wait_for(running(victim), 'the second pv copy'), victim)['id']
    pipe_file = os.path.join(cli.state_dir, dead_id + '.pipe.json')
    state = json.load(open(pipe_file))
    stages = [psutil.Process(pid) for pid in [state['wrapper_pid']] + list(state['pids'].values())]
    os.kill(victim.pid, signal.SIGKILL)  # the pipeline dies with it (PR_SET_PDEATHSIG)
    victim.communicate()
    _gone, alive = psutil.wait_procs(stages, timeout=10)
    assert not alive, 'the pipeline outlived its caller: %s' % alive
    assert [c['id'] for c in cli.status()['copies']] == [dead_id]
    out = cli.run('cleanup')
    assert out.returncode == 0, out.stderr
    assert 'removed      registry %s' % dead_id in out.stdout
    assert cli.status() == {'copies': []}
    assert not [n for n in os.listdir(cli.state_dir) if dead_id in n]


def test_set_limit_from_another_process(scratch, cli):
    size = 40 * SLOW * MiB  # > 4 s left at the new rate
    src, dst = scratch.loop(size // MiB), scratch.loop(size // MiB)
    digest = fill_random(src, size)
    proc = cli.start('copy', src, dst, '--limit', '2Mi', '--size', str(size))
    copy_id = copy_of(cli.wait_for(running(proc), 'the copy'), proc)['id']
    out = cli.run('set-limit', copy_id, '8Mi')
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'copy %s: limit now 8.00 MiB/s' % copy_id
    now = copy_of(cli.status(interval=1), proc)
    assert now['bps_limit'] == 8 * MiB
    assert 5 * MiB < now['progress']['rate_bps'] < 12 * MiB, now['progress']
    ratio, _copy_id, _backend, out = finish(proc)
    assert ratio is None
    assert 'limit changed from 2.00 MiB/s to 8.00 MiB/s during the copy' in out
    assert sha256_prefix(dst, size) == digest
    missing = cli.run('set-limit', copy_id, '1Mi')
    assert missing.returncode == 3 and 'no active copy' in missing.stderr


def test_check(scratch, cli):
    out = cli.run('check')
    assert out.returncode == 0, out.stdout + out.stderr
    assert '[ok]   controller %s' % cli.driver.controller in out.stdout
    assert out.stdout.rstrip().endswith('throttling works: cgroup backend')
    assert not os.path.exists(cli.driver.parent_path)  # the probe left nothing behind
    src, dst = scratch.loop(16), scratch.loop(16)
    out = cli.run('check', src, dst)
    assert out.returncode == 0, out.stdout + out.stderr
    name = os.path.basename(dst)
    assert re.search(r'backend cgroup .*limited: %s \(\d+:\d+\) write' % name, out.stdout)
    tmp = os.path.join(scratch.tmpfs(8), 'image')
    out = cli.run('check', src, tmp)
    assert re.search(r'limited: %s \(\d+:\d+\) read' % os.path.basename(src), out.stdout)
    # Nothing can throttle tmpfs -> tmpfs through a cgroup: refused, non-zero.
    out = cli.run('check', '--backend', 'cgroup', '/dev/zero', tmp)
    assert out.returncode == 1
    assert '[FAIL] /dev/zero -> %s: cgroup backend cannot throttle' % tmp in out.stdout
    assert cli.status() == {'copies': []} and cli.driver.leaves() == []


def _demo_dirs() -> set:
    return {d for d in os.listdir('/dev/shm') if d.startswith('cct-demo-')}


def _loops_over(directory: str) -> List[str]:
    losetup = subprocess.run(['losetup', '-a'], capture_output=True, text=True).stdout
    return [line for line in losetup.splitlines() if directory in line]


def test_demo(cli):
    out = cli.run('demo', '--size', '%dMi' % (16 * SLOW), '--limit', '4Mi')
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'demo: verified' in out.stdout
    ratio = float(SUMMARY.search(out.stdout).group(1))
    assert 0.8 <= ratio <= 1.15, ratio
    made = re.search(r'loop devices in (/dev/shm/cct-demo-\w+)\)', out.stdout)
    assert made, out.stdout
    assert not os.path.exists(made.group(1)) and not _loops_over(made.group(1))
    assert cli.driver.leaves() == [] and cli.status() == {'copies': []}


def test_demo_interrupted_removes_everything(cli):
    before = _demo_dirs()
    proc = cli.start('demo', '--size', '%dMi' % (32 * SLOW), '--limit', '2Mi')
    cli.wait_for(running(proc), 'the demo copy')
    dirs = _demo_dirs() - before
    assert len(dirs) == 1
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    out, err = proc.communicate(timeout=30 * SLOW)
    assert proc.returncode == 130, err
    assert 'interrupted' in err and 'Traceback' not in err
    assert not _demo_dirs() & dirs
    assert not _loops_over(dirs.pop())
    assert cli.driver.leaves() == [] and cli.status() == {'copies': []}


METRIC = re.compile(r'^(cinder_volume_copy_\w+)\{copy="([^"]*)",volume="([^"]*)",'
                    r'kind="(\w+)",backend="(\w+)"\} (\S+)$')


def _metrics(text: str) -> dict:
    """{(name, volume): value} of the per-copy gauges; every sample line must parse."""
    found = {}
    for line in text.splitlines():
        if line.startswith('#') or line.startswith('cinder_volume_copy_active '):
            continue
        match = METRIC.match(line)
        assert match, 'not a Prometheus sample line: %r' % line
        found[(match.group(1), match.group(3))] = float(match.group(6))
    return found


@pytest.mark.parametrize('backend', ['cgroup', 'pv'])
def test_volume_progress_and_metrics_from_another_process(scratch, cli, tmp_path, backend):
    size, rate = 24 * SLOW * MiB, 4 * MiB
    src, dst = scratch.loop(size // MiB), scratch.loop(size // MiB)
    digest = fill_random(src, size)
    volume = 'vol-%s' % secrets.token_hex(4)

    def volume_status() -> dict:
        out = cli.run('status', '--volume', volume, '--json', '--interval', '0.5')
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    before = volume_status()
    assert (before['progress'], before['state'], before['copies']) == ('NA', 'unknown', [])
    proc = cli.start('copy', src, dst, '--limit', '4Mi', '--size', str(size),
                     '--volume-id', volume, '--backend', backend)
    cli.wait_for(running(proc), 'the copy to make progress')
    during = volume_status()
    percent = int(during['progress'].rstrip('%'))
    assert during['state'] == 'copying' and 0 < percent < 100, during
    assert [c['backend'] for c in during['copies']] == [backend]
    assert during['copies'][0]['progress']['total_bytes'] == size
    text = cli.run('status', '--volume', volume, '--interval', '0.5')
    assert text.returncode == 0, text.stderr
    assert re.match(r'^volume %s: \d+%% \(copying\)\n  data copy-\d+-[0-9a-f]{8}: ' % volume,
                    text.stdout), text.stdout
    out = cli.run('metrics', '--interval', '0.5')
    assert out.returncode == 0, out.stderr
    print('\n' + out.stdout)
    gauges = _metrics(out.stdout)
    assert 0 < gauges[('cinder_volume_copy_bytes_done', volume)] <= size
    assert gauges[('cinder_volume_copy_bytes_total', volume)] == size
    assert gauges[('cinder_volume_copy_limit_bytes_per_second', volume)] == rate
    assert 0 < gauges[('cinder_volume_copy_progress_ratio', volume)] < 1
    assert 'cinder_volume_copy_active 1\n' in out.stdout
    textfile = str(tmp_path / 'cct.prom')
    out = cli.run('metrics', '--textfile', textfile, '--interval', '0.5')
    assert out.returncode == 0 and out.stdout == '', out.stderr
    assert _metrics(open(textfile).read())[('cinder_volume_copy_bytes_total', volume)] == size
    assert os.listdir(str(tmp_path)).count('cct.prom') == 1  # no temporary file left
    finish(proc)
    assert sha256_prefix(dst, size) == digest
    after = volume_status()
    assert (after['progress'], after['state'], after['copies']) == ('100%', 'done', [])
    assert after['finished']['ok'] is True and after['finished']['bytes_done'] == size
    assert after['finished']['backend'] == backend
    out = cli.run('metrics')
    assert out.stdout.endswith('cinder_volume_copy_active 0\n'), out.stdout
