"""cinder-volume as an unprivileged user, privileged steps through sudo + cinder-rootwrap.

As operators deploy it (doc/deployment.md): a system user, a sudoers rule for
cinder-rootwrap only, a rootwrap.conf over our filters and Cinder's. Copies run through
Cinder's real ``volume_utils.copy_volume`` in a process of that user; this test, as root,
watches the copy's cgroup leaf and limit appear and disappear.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import signal
import subprocess
import sysconfig
import textwrap
import time

import psutil
import pytest

from cinder_cgroup_throttle.cgroups import get_driver
from tests.functional.nonroot import BIN, user_python
from tests.scratch import (LeafRateProbe, MiB, FileSizeProbe, cgroup_dirs, fill_random,
                           leaf_device_bytes, leaf_write_limits, majmin, sha256_prefix,
                           sampling_on_time, slope)
from tests.unit.test_rootwrap_filters import EXEC_DIRS

pytestmark = [pytest.mark.kernel, pytest.mark.cinder]

RATE = 8 * MiB
LIMIT_FILE = {'blkio': 'blkio.throttle.write_bps_device', 'io': 'io.max'}
SIZE_MB = 24

# Runs as the unprivileged user: Cinder's copy_volume with our throttle installed as
# BaseVD.set_throttle() does, nothing else configured but Cinder's rootwrap_config.
USER_SCRIPT = textwrap.dedent('''
    import json, site, sys
    site.addsitedir(sys.argv[6])  # this environment's packages only (python -S)
    from cinder import utils
    from cinder.common import config  # noqa: F401  (registers rootwrap_config)
    from oslo_config import cfg
    cfg.CONF([], project='cinder', default_config_files=[])
    cfg.CONF.set_override('rootwrap_config', sys.argv[1])
    from cinder.volume import throttling, volume_utils
    from cinder_cgroup_throttle.throttle import CgroupThrottle
    throttle = CgroupThrottle(int(sys.argv[2]), cgroup_name=sys.argv[3])
    throttling.Throttle.set_default(throttle)
    ran = []
    def execute(*cmd, **kw):
        out, err = utils.execute(*cmd, **kw)
        ran.append((list(cmd), err))
        return out, err
    copies = json.loads(sys.argv[4])
    for src, dst in copies:
        volume_utils.copy_volume(src, dst, int(sys.argv[5]), '1M', execute=execute,
                                 ionice='-c2')
    print(json.dumps({'driver': type(throttle.manager.driver).__name__,
                      'ran': ran}))
''')


def run_as(user, conf, state, parent, copies):
    env = {'PATH': ':'.join([BIN] + EXEC_DIRS), 'CINDER_CGROUP_THROTTLE_STATE_DIR': state,
           'PYTHONPATH': os.path.dirname(os.path.dirname(os.path.dirname(
               os.path.abspath(__file__)))), 'PYTHONDONTWRITEBYTECODE': '1'}
    argv = ['runuser', '-u', user, '--', 'env', '-i'] + ['%s=%s' % kv for kv in env.items()]
    argv += [user_python(user), '-S', '-c', USER_SCRIPT, conf, str(RATE), parent,
             json.dumps(copies), str(SIZE_MB), sysconfig.get_paths()['purelib']]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd='/')


def test_copy_as_unprivileged_user_through_rootwrap(scratch, cgroup_parent, deployment):
    user, conf, state = deployment.user, deployment.conf, deployment.state
    size = SIZE_MB * MiB
    src, dst = scratch.loop(32), scratch.loop(32)
    digest = fill_random(src, size)
    work = scratch.tmpfs(64)
    fsrc, fdst = os.path.join(work, 'src.img'), os.path.join(work, 'dst.img')
    fdigest = fill_random(fsrc, size)
    os.chmod(os.path.dirname(work), 0o711)  # scratch dirs are private to root
    os.chmod(work, 0o755)

    driver = get_driver(cgroup_parent)
    # A parent found in place (an operator made it) stays: the privsep daemon did not make it.
    os.makedirs(driver.parent_path, exist_ok=True)
    leaf_probe, pipe_probe = LeafRateProbe(cgroup_parent), FileSizeProbe(fdst)
    leaf_probe.__enter__()
    pipe_probe.__enter__()
    proc = run_as(user, conf, state, cgroup_parent, [[src, dst], [fsrc, fdst]])
    seen_limits, seen_pipe = set(), []
    while proc.poll() is None:  # watch the copies from outside, as root
        for leaf in driver.leaves():
            try:
                with open(os.path.join(driver.leaf_path(leaf), LIMIT_FILE[
                        driver.controller])) as f:
                    seen_limits.update(tuple(line.split()) for line in f)
            except FileNotFoundError:
                pass
        for name in os.listdir(state):
            if name.endswith('.pipe.json'):
                path = os.path.join(state, name)
                with open(path) as f:
                    pipe_state = json.load(f)
                seen_pipe.append((os.stat(path).st_uid, pipe_state['bytes'] or 0))
        time.sleep(0.05)
    leaf_probe.__exit__()
    pipe_probe.__exit__()
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])

    assert result['driver'] == 'PrivilegedDriver'
    rdev = os.stat(dst).st_rdev
    dst_majmin = '%d:%d' % (os.major(rdev), os.minor(rdev))
    assert ((dst_majmin, str(RATE)) in seen_limits  # v1 blkio
            or (dst_majmin, 'rbps=max', 'wbps=%d' % RATE, 'riops=max', 'wiops=max')
            in seen_limits), seen_limits  # v2 io.max
    # The root pipeline wrote its state as the user, and could read pv's progress.
    assert seen_pipe and {uid for uid, _ in seen_pipe} == {pwd.getpwnam(user).pw_uid}
    assert 0 < max(done for _, done in seen_pipe) <= size
    assert sha256_prefix(dst, size) == digest
    assert sha256_prefix(fdst, size) == fdigest
    copies = [(cmd, err) for cmd, err in result['ran'] if 'count=%d' % size in cmd]
    assert [cmd[0] for cmd, _ in copies] == ['cgexec', 'cinder-cgroup-throttle-pipe']
    # Rates from the kernel's counters, sampled here over 10-90 % of each copy: the leaf's
    # bytes written (cgexec), the bytes allocated to the file (pipeline); sudo and rootwrap
    # start-up, slow on a loaded host, are not the throttle's doing.
    (leaf,) = leaf_probe.series
    measured = {'cgexec': leaf_probe.rate(leaf, total=size),
                'cinder-cgroup-throttle-pipe': pipe_probe.rate(fdst, total=size)}
    for cmd, err in copies:
        assert cmd[cmd.index('dd') - 2:cmd.index('dd')] == ['ionice', '-c2']
        copied = re.search(r'^(\d+) bytes .* copied', err, re.M)  # the writer's, for pv
        assert copied and int(copied.group(1)) == size, err
        ratio = measured[cmd[0]] / RATE
        print('%s: achieved/limit %.3f' % (cmd[0], ratio))  # shown with pytest -s
        assert 0.97 <= ratio <= 1.03, '%s: achieved/limit %.3f' % (cmd[0], ratio)
    assert driver.leaves() == []
    assert os.path.isdir(driver.parent_path)
    assert os.listdir(state) == [] or all(n.startswith('.') for n in os.listdir(state))


# cinder-volume as it really runs: eventlet-patched before anything else, privsep started
# with Cinder's root helper, copies in greenthreads. Two copies and a re-limit under a
# host-wide cap (so every start, re-limit and end re-balances the other copy through the
# privsep daemon while holding the re-balance lock), and a ticker that must never starve.
EVENTLET_SCRIPT = textwrap.dedent('''
    import json, site, sys
    site.addsitedir(sys.argv[4])  # this environment's packages only (python -S)
    from cinder import monkey_patch
    monkey_patch.patch()  # first, as cinder/cmd/volume.py does
    import logging, shlex, time
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    import eventlet
    from cinder import utils
    from cinder.common import config  # noqa: F401  (registers rootwrap_config)
    from oslo_config import cfg
    from oslo_privsep import priv_context
    cfg.CONF([], project='cinder', default_config_files=[])
    cfg.CONF.set_override('rootwrap_config', sys.argv[1])
    priv_context.init(root_helper=shlex.split(utils.get_root_helper()))  # as volume.py
    from cinder.volume import throttling, volume_utils
    from cinder_cgroup_throttle.manager import CopyManager
    from cinder_cgroup_throttle.throttle import CgroupThrottle
    plan = json.loads(sys.argv[2])
    throttle = CgroupThrottle(plan['rate'], manager=CopyManager(
        sys.argv[3], host_bps_limit=plan['cap']))
    throttling.Throttle.set_default(throttle)
    ticks, events, errs = [time.monotonic()], [], {}
    done = False

    def ticker():
        while not done:
            eventlet.sleep(0.1)
            ticks.append(time.monotonic())

    def copy(src, dst, mib):
        def execute(*cmd, **kw):
            out, err = utils.execute(*cmd, **kw)
            if 'count=%d' % (mib * 1048576) in cmd:
                errs[dst] = err
            return out, err
        volume_utils.copy_volume(src, dst, mib, '1M', execute=execute)
        events.append(('end', dst, time.monotonic()))

    def running(copy):  # its dd is in its cgroup (cgroupfs is world-readable)
        with open(throttle.manager.driver.leaf_path(copy.id) + '/cgroup.procs') as f:
            return bool(f.read().split())

    def relimit(dst, rate, after):
        while not (len(throttle.manager.active()) == 2
                   and all(running(c) for c in throttle.manager.active())):
            eventlet.sleep(0.02)
        eventlet.sleep(after)
        copy_id = [c.id for c in throttle.manager.active() if c.dst == dst][0]
        throttle.set_limit(copy_id, rate)
        events.append(('relimit', dst, time.monotonic()))

    tick = eventlet.spawn(ticker)
    workers = [eventlet.spawn(copy, *c) for c in plan['copies']]
    workers.append(eventlet.spawn(relimit, *plan['relimit']))
    for w in workers:
        w.wait()
    done = True
    tick.wait()
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    print(json.dumps({'max_gap': max(gaps), 'ticks': len(ticks), 'events': events,
                      'dd': errs, 'driver': type(throttle.manager.driver).__name__}))
''')


def leaf_sample(path):
    """(write limit per device, bytes written per device) of a leaf, v1 or v2; read here,
    not through the code under test."""
    limits, found = leaf_write_limits(path), leaf_device_bytes(path)
    if limits is None or found is None:
        return None
    return limits, {dev: w for dev, (_, w) in found.items()}


def leaf_dirs(cgroup_parent):
    """The copy leaves under the parent, found in cgroupfs (not through the driver)."""
    found = []
    for parent in cgroup_dirs(cgroup_parent):
        try:
            found += [e.path for e in os.scandir(parent) if e.is_dir()]
        except FileNotFoundError:
            pass
    return found


def stable_rates(samples, dev, min_span=1.0):
    """From (time, limits, written) samples of one leaf: for every stretch with one write
    limit on ``dev`` while dd was writing (from the first to the last sample that counted
    more bytes, at least ``min_span`` s long),
    (limit, bytes the cgroup counted / seconds)."""
    runs, out = [], []
    for t, limits, written in samples:
        limit = limits.get(dev)
        if runs and runs[-1][0] == limit:
            runs[-1][1].append((t, written.get(dev, 0)))
        else:
            runs.append((limit, [(t, written.get(dev, 0))]))
    for limit, points in runs:
        moved = [b for a, b in zip(points, points[1:]) if b[1] > a[1]]
        if not moved:
            continue
        # Only samples that just saw the counter move: it steps by dd's block size.
        if limit and moved[-1][0] - moved[0][0] >= min_span:
            out.append((limit, slope(moved)))
    return out


CAP_DAC_OVERRIDE = 1 << 1  # linux/capability.h


def privsep_socks(pid):
    """The --privsep_sock_path of daemon starts below ``pid`` (sudo, cinder-rootwrap and
    privsep-helper carry it on their command lines while the daemon starts)."""
    socks = set()
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return socks
    for p in procs:
        try:
            cmd = p.cmdline()
        except psutil.NoSuchProcess:
            continue
        if '--privsep_sock_path' in cmd[:-1]:
            socks.add(cmd[cmd.index('--privsep_sock_path') + 1])
    return socks


def privsep_daemon_caps(socks):
    """{daemon pid: (euid, CapPrm, CapEff, CapInh)} of the privsep daemons serving
    ``socks``, read from /proc. privsep-helper forks: the parent, a child of
    cinder-rootwrap, exits; the daemon goes on detached and drops to its context's
    capabilities."""
    found = {}
    for p in psutil.process_iter(['name', 'cmdline', 'ppid', 'status']):
        cmd = p.info['cmdline'] or []
        if (p.info['name'] != 'privsep-helper' or p.info['status'] == psutil.STATUS_ZOMBIE
                or '--privsep_sock_path' not in cmd[:-1]
                or cmd[cmd.index('--privsep_sock_path') + 1] not in socks):
            continue
        try:
            if psutil.Process(p.info['ppid']).name() == 'cinder-rootwrap':
                continue  # the daemon's start, not the daemon
            with open('/proc/%d/status' % p.pid) as f:
                status = dict(line.split(':', 1) for line in f if ':' in line)
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            continue
        found[p.pid] = (int(status['Uid'].split()[1]),) + tuple(
            int(status[k], 16) for k in ('CapPrm', 'CapEff', 'CapInh'))
    return found


def test_eventlet_service_with_greenthread_copies_and_relimit(scratch, cgroup_parent,
                                                              deployment):
    """Cap 8 MiB/s, each copy asks 8 MiB/s: alone a copy gets 8, together 4 + 4; B
    re-limited to 2 MiB/s gives A 6; when B ends A gets 8 again."""
    user, conf, state = deployment.user, deployment.conf, deployment.state
    a_mib, b_mib = 48, 14
    a_src, a_dst, b_src, b_dst = (scratch.loop(56) for _ in range(4))
    a_digest, b_digest = fill_random(a_src, a_mib * MiB), fill_random(b_src, b_mib * MiB)
    plan = {'rate': 8 * MiB, 'cap': 8 * MiB,
            'copies': [[a_src, a_dst, a_mib], [b_src, b_dst, b_mib]],
            'relimit': [b_dst, 2 * MiB, 2.0]}
    env = {'PATH': ':'.join(EXEC_DIRS[1:]),  # the venv's bin is not on the user's PATH
           'CINDER_CGROUP_THROTTLE_STATE_DIR': state, 'PYTHONDONTWRITEBYTECODE': '1',
           'PYTHONPATH': os.path.dirname(os.path.dirname(os.path.dirname(
               os.path.abspath(__file__))))}
    argv = ['runuser', '-u', user, '--', 'env', '-i'] + ['%s=%s' % kv for kv in env.items()]
    argv += [user_python(user), '-S', '-c', EVENTLET_SCRIPT, conf, json.dumps(plan),
             cgroup_parent, sysconfig.get_paths()['purelib']]
    driver = get_driver(cgroup_parent)
    if os.path.isdir(driver.parent_path):
        os.rmdir(driver.parent_path)  # the session's; empty between tests
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd='/', start_new_session=True)
    samples = {}  # leaf -> [(time, limits, written)]
    socks, daemons, next_scan = set(), {}, 0.0
    deadline = time.monotonic() + 120
    try:
        with sampling_on_time():
            while proc.poll() is None and time.monotonic() < deadline:
                socks |= privsep_socks(proc.pid)  # cheap: the service has a few children
                if socks and time.monotonic() >= next_scan:
                    daemons.update(privsep_daemon_caps(socks))  # the last reading of each
                    next_scan = time.monotonic() + 0.5
                for leaf in leaf_dirs(cgroup_parent):
                    sample = leaf_sample(leaf)
                    if sample:
                        samples.setdefault(leaf, []).append((time.monotonic(),) + sample)
                time.sleep(0.01)
    finally:
        if proc.poll() is None:  # timed out or the test failed: the service and its dd
            os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    print("eventlet: max tick gap %.3f s over %d ticks; events %s" % (
        result["max_gap"], result["ticks"], result["events"]))

    assert result['driver'] == 'PrivilegedDriver'
    assert result['max_gap'] <= 0.5, result
    # Least privilege: the daemon that wrote the cgroups held CAP_DAC_OVERRIDE and nothing
    # else (effective, permitted, inheritable), as euid 0 of the root helper.
    print('eventlet: privsep daemons (euid, CapPrm, CapEff, CapInh) %s' % daemons)
    assert daemons and all(caps == (0, CAP_DAC_OVERRIDE, CAP_DAC_OVERRIDE, 0)
                           for caps in daemons.values()), daemons
    assert sha256_prefix(a_dst, a_mib * MiB) == a_digest
    assert sha256_prefix(b_dst, b_mib * MiB) == b_digest
    for dst, mib in ((a_dst, a_mib), (b_dst, b_mib)):
        copied = re.search(r'^(\d+) bytes .* copied', result['dd'][dst], re.M)
        assert copied and int(copied.group(1)) == mib * MiB, result['dd'][dst]
    assert [e[0] for e in sorted(result['events'], key=lambda e: e[2])] == [
        'relimit', 'end', 'end'], result['events']

    by_dev = {}
    for leaf, leaf_samples in samples.items():
        for dev in (majmin(a_dst), majmin(b_dst)):
            if any(dev in s[1] for s in leaf_samples):
                by_dev[dev] = leaf_samples
    assert set(by_dev) == {majmin(a_dst), majmin(b_dst)}, samples.keys()
    sequence = {}
    for dev, leaf_samples in by_dev.items():
        seen = [s[1].get(dev) for s in leaf_samples if s[1].get(dev)]
        sequence[dev] = [v for i, v in enumerate(seen) if i == 0 or seen[i - 1] != v]
    # The limits each copy had, in order (A may have started alone at the whole cap).
    a_seq = sequence[majmin(a_dst)]
    assert a_seq[-3:] == [4 * MiB, 6 * MiB, 8 * MiB] and a_seq[0] in (4 * MiB, 8 * MiB), \
        sequence
    assert sequence[majmin(b_dst)][-2:] == [4 * MiB, 2 * MiB], sequence
    rates = {dev: stable_rates(by_dev[dev], dev) for dev in by_dev}
    print('eventlet: (limit, achieved by cgroup counters) %s' % rates)
    checked = [(limit, rate) for runs in rates.values() for limit, rate in runs]
    assert len(checked) >= 4, rates
    # Each stretch starts when the test saw a new limit (sampled every 10 ms), so it holds
    # a little of the previous rate: measured 0.979-1.003.
    for limit, rate in checked:
        assert 0.95 <= rate / limit <= 1.05, rates
    assert driver.leaves() == []
    # The privsep daemon made the parent, so it removed it with the last leaf.
    assert not os.path.exists(driver.parent_path)


# The operator CLI as the service user: its cgroup probe goes through the privsep daemon,
# started with the root helper (here the test's rootwrap.conf instead of /etc/cinder's).
CLI_SCRIPT = textwrap.dedent('''
    import site, sys
    site.addsitedir(sys.argv[3])
    from oslo_privsep import priv_context
    priv_context.init(root_helper=['sudo', 'cinder-rootwrap', sys.argv[1]])
    from cinder_cgroup_throttle import cli
    sys.exit(cli.main(['--cgroup-name', sys.argv[2], 'check']))
''')


@pytest.mark.parametrize('layout', ['venv bin in exec_dirs', 'venv bin missing'])
def test_cli_check_as_the_service_user(scratch, cgroup_parent, deployment, layout):
    user, conf, state = deployment.user, deployment.conf, deployment.state
    if layout == 'venv bin missing':  # rootwrap cannot find privsep-helper
        with open(conf) as f:
            text = f.read()
        with open(conf, 'w') as f:
            f.write(text.replace('exec_dirs=%s,' % BIN, 'exec_dirs='))
    env = {'PATH': ':'.join(EXEC_DIRS[1:]), 'CINDER_CGROUP_THROTTLE_STATE_DIR': state,
           'PYTHONPATH': os.path.dirname(os.path.dirname(os.path.dirname(
               os.path.abspath(__file__)))), 'PYTHONDONTWRITEBYTECODE': '1'}
    argv = ['runuser', '-u', user, '--', 'env', '-i'] + ['%s=%s' % kv for kv in env.items()]
    argv += [user_python(user), '-S', '-c', CLI_SCRIPT, conf, cgroup_parent,
             sysconfig.get_paths()['purelib']]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd='/', timeout=120)
    lines = [line for line in proc.stdout.splitlines() if 'cgroup controller' in line
             or line.startswith('[ok]   controller')]
    if layout == 'venv bin in exec_dirs':
        assert any('usable' in line and 'through sudo cinder-rootwrap %s privsep-helper'
                   % conf in line for line in lines), proc.stdout + proc.stderr
        assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        assert proc.returncode != 0
        assert any(line.startswith('[FAIL] cgroup controller: the privsep daemon did not '
                                   'start') and 'exited 96 (cinder-rootwrap: 99' in line
                   for line in lines), proc.stdout
    assert get_driver(cgroup_parent).leaves() == []
