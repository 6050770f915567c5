"""What an attacker with the cinder account can plant, against root's real entry points.

The deployment of doc/deployment.md: cinder-volume's user owns the state directory and
reaches root only through sudo + cinder-rootwrap; an operator runs the CLI as root. Every
hostile input must end within 5 s with a named error (exit status != 0, no traceback),
with nothing changed outside the state directory (a root-owned "victim" directory next
to it, holding 0600 secrets) and the planted files left alone. Threat model:
doc/operations.md. The oracles (file snapshots, exit codes) import nothing of the package.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time

import pytest

from tests.functional.nonroot import BIN, user_python

pytestmark = [pytest.mark.kernel]

CLI = os.path.join(BIN, 'cinder-cgroup-throttle')
TIMEOUT = 5.0
RACE_WRITES = 1000
CLI_RUNS = 20


def snapshot(top):
    """Every path under ``top`` (links not followed): type, mode, owner, content."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if os.path.islink(path):
                content = os.readlink(path)
            elif os.path.isfile(path):
                with open(path, 'rb') as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            else:
                content = None
            seen[os.path.relpath(path, top)] = (st.st_mode, st.st_uid, content)
    return seen


@pytest.fixture
def victim(scratch):
    """Root's files next to the state directory, which no copy may ever touch."""
    top = os.path.join(scratch.dir, 'victim')
    os.mkdir(top, 0o755)
    for name, text in (('secret', 'top secret\n'), ('foo.json', '{"keep": 1}'),
                       ('foo.rate', '{"rate": 1}')):
        path = os.path.join(top, name)
        with open(path, 'w') as f:
            f.write(text)
        os.chmod(path, 0o600)
    before = snapshot(top)
    yield top
    assert snapshot(top) == before, 'root changed files outside the state directory'


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen(['true'])
    proc.wait()
    return proc.pid


def entry(copy_id, owner_pid, **kw):
    """A registry entry as CopyManager writes it."""
    data = dict(id=copy_id, owner_pid=owner_pid, owner_start=None, src='/dev/zero',
                dst='/dev/null', src_dev=None, dst_dev=None, bps_limit=1 << 20,
                backend='none', reason='planted', started=time.time(), volume_id=None,
                cgroup=None, mountpoint=None, total_bytes=None, extra={},
                src_via_file=False, dst_via_file=False)
    data.update(kw)
    return data


def plant(deployment, name, data=None, fifo=False, link=None):
    """A file of the cinder account in its state directory."""
    path = os.path.join(deployment.state, name)
    if fifo:
        os.mkfifo(path, 0o644)
    elif link is not None:
        os.symlink(link, path)
    else:
        with open(path, 'w') as f:
            f.write(data if isinstance(data, str) else json.dumps(data))
    os.lchown(path, deployment.uid, deployment.gid)
    return path


def as_root(cgroup_parent, deployment, *args):
    """The CLI as an operator runs it (root), with a hard time limit."""
    argv = [CLI, '--state-dir', deployment.state, '--cgroup-name', cgroup_parent] + list(args)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    assert 'Traceback' not in proc.stderr, proc.stderr
    return proc


def state_names(deployment):
    return sorted(os.listdir(deployment.state))


# -- 1. an entry's id is never a path ----------------------------------------------------
def test_entry_id_cannot_make_root_delete_or_write_outside(cgroup_parent, deployment, victim,
                                                           dead_pid):
    mine = os.getpid()
    planted = [
        plant(deployment, 'copy-%d-0000dead.json' % dead_pid,
              entry('../victim/foo', dead_pid)),
        plant(deployment, 'copy-%d-0000beef.json' % mine,
              entry('../victim/foo', mine, volume_id='vol-none')),
        plant(deployment, 'copy-%d-0000cafe.json' % mine,
              entry('../victim/bar', mine, backend='pv', volume_id='vol-pv')),
    ]
    cleanup = as_root(cgroup_parent, deployment, 'cleanup')
    assert cleanup.returncode == 1
    assert cleanup.stdout.count('foreign') == 3, cleanup.stdout
    assert "field 'id': invalid value '../victim/foo'" in cleanup.stdout
    for ident in ('copy-%d-0000beef' % mine, 'vol-none', 'vol-pv'):
        proc = as_root(cgroup_parent, deployment, 'set-limit', ident, '2Mi')
        assert proc.returncode == 3, proc.stderr  # no valid copy has that id
    # cinder-volume (root) starting: its CopyManager cleans up after its predecessor.
    start = subprocess.run(
        [sys.executable, '-c', 'import sys; from cinder_cgroup_throttle import manager, '
         'registry; manager.CopyManager(sys.argv[1], backend="pv", '
         'registry=registry.Registry(sys.argv[2]))', cgroup_parent, deployment.state],
        capture_output=True, text=True, timeout=TIMEOUT)
    assert start.returncode == 0 and "invalid value '../victim/foo'" in start.stderr, (
        start.stderr)
    assert all(os.path.exists(path) for path in planted)


# -- 2. no chmod, open or write through a swapped link -------------------------------------
ATTACKER = textwrap.dedent('''
    import os, signal, sys
    state, target = sys.argv[1:3]
    swaps = 0
    prefixes = ['.copy-', 'copy-']  # SIGUSR1: temporary files only, entries stay valid
    def stop(signum, frame):
        print(swaps, flush=True)
        os._exit(0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, lambda signum, frame: prefixes.pop())
    print('ready', flush=True)
    while True:  # every file root is writing (temporary files) or has written
        for name in os.listdir(state):
            path = os.path.join(state, name)
            if name.startswith(tuple(prefixes)) and not os.path.islink(path):
                try:
                    os.unlink(path)
                    os.symlink(target, path)
                    swaps += 1
                except OSError:
                    pass
''')


def test_symlink_swap_race_changes_nothing_outside(cgroup_parent, deployment, victim, scratch):
    from cinder_cgroup_throttle.registry import Registry
    python = user_python(deployment.user)

    def drop_privileges():
        os.setgroups([])
        os.setgid(deployment.gid)
        os.setuid(deployment.uid)

    attacker = subprocess.Popen(
        [python, '-S', '-c', ATTACKER, deployment.state, os.path.join(victim, 'secret')],
        stdout=subprocess.PIPE, text=True, preexec_fn=drop_privileges, cwd='/')
    scratch.defer('kill attacker', lambda: attacker.poll() is None and attacker.kill())
    assert attacker.stdout.readline().strip() == 'ready'
    registry = Registry(deployment.state)
    data = entry('copy-%d-00005a4e' % os.getpid(), os.getpid())
    from cinder_cgroup_throttle.registry import Entry
    saved = loaded = 0
    for _ in range(RACE_WRITES):  # what root's set-limit and rebalance do
        try:
            registry.save(Entry(**data))
            saved += 1
        except OSError:
            pass  # the attacker removed our temporary file before the rename
        loaded += registry.load(data['id']) is not None
    # The operator's set-limit as root, under attack on the files it writes.
    attacker.send_signal(signal.SIGUSR1)
    codes = set()
    for _ in range(CLI_RUNS):
        path = os.path.join(deployment.state, data['id'] + '.json')
        if os.path.lexists(path):
            os.unlink(path)
        plant(deployment, data['id'] + '.json', data)
        proc = as_root(cgroup_parent, deployment, 'set-limit', data['id'], '3Mi')
        codes.add(proc.returncode)
        assert proc.returncode in (0, 3) or 'error: ' in proc.stderr, proc.stderr
    # done, a named error (the attacker removed root's temporary file), or the entry was
    # swapped for a link, which is no copy
    assert codes <= {0, 1, 3}, codes
    attacker.send_signal(signal.SIGTERM)
    swaps = int(attacker.communicate(timeout=TIMEOUT)[0].split()[-1])
    print('race: %d writes (%d completed), %d reads of a valid entry, %d CLI set-limit '
          '(exit %s), %d swaps' % (RACE_WRITES, saved, loaded, CLI_RUNS, sorted(codes), swaps))
    assert swaps > 0 and saved > 0
    # the victim fixture asserts that nothing outside the state directory changed


# -- 3. planted files neither hang nor crash root --------------------------------------------
def test_planted_files_are_reported_and_left_alone(cgroup_parent, deployment, victim,
                                                   dead_pid):
    mine = os.getpid()
    planted = {
        'copy-%d-00000f1f.json' % mine: dict(fifo=True),
        'copy-%d-00000000.json' % mine: dict(link='/dev/zero'),
        'copy-%d-0000005e.json' % mine: dict(link=os.path.join(victim, 'secret')),
        'copy-%d-000000aa.json' % mine: dict(data=entry('copy-%d-000000aa' % mine, '123')),
        'copy-%d-000000bb.json' % mine: dict(data=entry('copy-%d-000000bb' % mine, [1])),
        'copy-%d-000000cc.json' % mine: dict(data=' ' * (1 << 20)),
        'copy-%d-000000dd.json' % mine: dict(data=entry(
            'copy-%d-000000dd' % mine, mine, extra={'static': {'read_bps': 'x'}})),
        'copy-%d-000000ee.json' % mine: dict(data='[' * 100000),
        'copy-%d-0000dead.pipe.json' % dead_pid: dict(fifo=True),
        'copy-%d-0000d0d0.rate' % dead_pid: dict(link='/dev/zero'),
        'notes': dict(data='hello'),
    }
    for name, how in planted.items():
        plant(deployment, name, **how)
    names = state_names(deployment)
    t0 = time.monotonic()
    status = as_root(cgroup_parent, deployment, 'status', '--interval', '0')
    cleanup = as_root(cgroup_parent, deployment, 'cleanup')
    print('status + cleanup over %d planted files: %.2f s'
          % (len(planted), time.monotonic() - t0))
    assert status.returncode == 1 and cleanup.returncode == 1
    for name in planted:
        if not name.endswith(('.pipe.json', '.rate')):  # status reads entries only
            assert repr(name) in status.stderr, (name, status.stderr)
        assert os.path.join(deployment.state, name) + ':' in cleanup.stdout, (
            name, cleanup.stdout)
    assert state_names(deployment) == names


def test_lock_file_fifo_is_a_named_error(cgroup_parent, deployment, victim):
    plant(deployment, '.relimit.lock', fifo=True)
    plant(deployment, 'copy-%d-0000beef.json' % os.getpid(),
          entry('copy-%d-0000beef' % os.getpid(), os.getpid()))
    proc = as_root(cgroup_parent, deployment, 'set-limit', 'copy-%d-0000beef' % os.getpid(),
                   '2Mi')
    assert proc.returncode == 1 and "'.relimit.lock'" in proc.stderr, proc.stderr


def test_unsafe_state_directory_is_refused(cgroup_parent, deployment, scratch):
    link = os.path.join(scratch.dir, 'state-link')
    os.symlink(deployment.state, link)
    for state, why in ((link, 'symbolic link'), (deployment.state, 'writable by group')):
        if state == deployment.state:
            os.chmod(state, 0o775)
        proc = subprocess.run([CLI, '--state-dir', state, 'status', '--interval', '0'],
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == 1 and why in proc.stderr, proc.stderr
        assert 'Traceback' not in proc.stderr
    os.chmod(deployment.state, 0o755)


# -- 4. hostile arguments through sudo + cinder-rootwrap, as cinder-volume's user ----------
def rootwrap(deployment, *cmd):
    proc = subprocess.run(deployment.rootwrap(*cmd), capture_output=True, text=True,
                          timeout=TIMEOUT + 5, cwd='/')  # sudo + rootwrap start-up
    assert 'Traceback' not in proc.stderr, proc.stderr
    return proc


# The cgroup steps: calls into this package's privsep daemon, started by the user through
# sudo + cinder-rootwrap (which admits any privsep-helper command line: the daemon's own
# checks are the boundary).
PRIVSEP_CALLS = textwrap.dedent('''
    import json, site, sys
    site.addsitedir(sys.argv[3])  # this environment's packages only (python -S)
    from oslo_privsep import priv_context
    priv_context.init(root_helper=['sudo', '-n', 'cinder-rootwrap', sys.argv[1]])
    from cinder_cgroup_throttle import privsep
    out = []
    for name, args in json.loads(sys.argv[2]):
        try:
            out.append(['ok', getattr(privsep, name)(*args)])
        except Exception as exc:
            out.append([type(exc).__name__, str(exc)])
    print(json.dumps(out))
''')


def privsep_calls(deployment, calls):
    """Make ``calls`` ((entrypoint, args) pairs) as the user; [(error class or 'ok', text)]."""
    env = {'PATH': '%s:/usr/sbin:/usr/bin:/sbin:/bin' % BIN, 'PYTHONDONTWRITEBYTECODE': '1',
           'PYTHONPATH': os.path.dirname(os.path.dirname(os.path.dirname(
               os.path.abspath(__file__))))}
    argv = ['runuser', '-u', deployment.user, '--', 'env', '-i']
    argv += ['%s=%s' % kv for kv in env.items()]
    argv += [user_python(deployment.user), '-S', '-c', PRIVSEP_CALLS, deployment.conf,
             json.dumps(calls), sysconfig.get_paths()['purelib']]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd='/')
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_privsep_daemon_refuses_trailing_newlines_and_bad_numbers(cgroup_parent, deployment,
                                                                  scratch):
    from cinder_cgroup_throttle.cgroups import get_driver
    driver = get_driver(cgroup_parent)
    ctl = driver.controller
    leaf = 'copy-%d-0000b16b' % os.getpid()
    scratch.defer('remove ' + leaf, lambda: os.path.isdir(driver.leaf_path(leaf))
                  and os.rmdir(driver.leaf_path(leaf)))
    rdev = os.stat(scratch.loop(8)).st_rdev
    disk = '%d:%d' % (os.major(rdev), os.minor(rdev))
    huge = str(2**64 + 1000)
    refused = [
        (['create_leaf', [ctl, cgroup_parent, leaf + '\n', []]], 'not a copy id'),
        (['create_leaf', [ctl, cgroup_parent + '\n', leaf, []]], 'invalid cgroup name'),
        (['create_leaf', [ctl + '\n', cgroup_parent, leaf, []]], 'this host throttles'),
        (['create_leaf', [ctl, cgroup_parent, leaf, [[disk, '1\n', '0', '0', '0']]]],
         'rbps must be an integer from 0 to'),
        (['write_limits', [ctl, cgroup_parent, leaf,
                           [['99999999999999999999:1', '1', '0', '0', '0']], []]],
         'device must be MAJ:MIN'),
        (['write_limits', [ctl, cgroup_parent, leaf, [['7:99999999999', '1', '0', '0', '0']],
                           []]], 'device must be MAJ:MIN'),
        (['write_limits', [ctl, cgroup_parent, leaf, [[disk, '0', huge, '0', '0']], []]],
         'wbps must be an integer from 0 to'),
        (['write_limits', [ctl, cgroup_parent, leaf, [[disk, huge, '0', '0', '0']], []]],
         'rbps must be an integer from 0 to'),
        (['try_remove_leaf', [ctl, cgroup_parent, leaf, 'yes']], 'kill must be'),
    ]
    calls = ([['create_leaf', [ctl, cgroup_parent, leaf, []]]] + [c for c, _ in refused]
             + [['try_remove_leaf', [ctl, cgroup_parent, leaf, False]]])
    out = privsep_calls(deployment, calls)
    assert out[0][0] == 'ok', out[0]
    for (call, named), (kind, text) in zip(refused, out[1:-1]):
        assert kind == 'ThrottleError' and named in text, (call, kind, text)
    assert out[-1] == ['ok', [True, []]], out[-1]
    assert not os.path.exists(driver.leaf_path(leaf))
    assert not os.path.exists(driver.leaf_path(leaf) + '\n')


def test_pipe_wrapper_refuses_huge_rate_and_linked_state_dir(deployment, victim):
    link = plant(deployment, 'elsewhere', link=victim)
    dd = ['dd', 'if=/dev/zero', 'of=/dev/null', 'count=4096', 'bs=4096',
          'iflag=count_bytes']
    cid = 'copy-%d-0000f1fe' % os.getpid()
    for rate, state, named in ((str(2**64 + 1000), deployment.state, 'invalid --rate'),
                               ('1048576', link, 'is a symbolic link')):
        proc = rootwrap(deployment, 'cinder-cgroup-throttle-pipe', '--id', cid, '--rate',
                        rate, '--state-dir', state, '--', *dd)
        assert proc.returncode == 2 and named in proc.stderr, proc.stderr


# -- 5. hostile CLI arguments -------------------------------------------------------------
@pytest.mark.parametrize('args', [
    ['copy', '/dev/zero', '/dev/null', '--limit=--', '--size', '1M'],
    ['copy', '/dev/zero', '/dev/null', '--limit', '8Mi', '--size=--'],
    ['copy', '/dev/zero', '/dev/null', '--limit', str(2**64 + 1000), '--size', '1M'],
    ['copy', '/dev/zero', '/dev/null', '--limit', '9' * 5000, '--size', '1M'],
    ['set-limit', 'copy-1-0000abcd', str(2**64)],
    ['set-limit', 'copy-1-0000abcd', '1e30'],
    ['status', '--interval=--'],
    ['demo', '--limit=--'],
], ids=lambda a: ' '.join(a)[:40])
def test_cli_bad_arguments_are_usage_errors(cgroup_parent, deployment, args):
    proc = as_root(cgroup_parent, deployment, *args)
    assert proc.returncode == 2 and 'error: argument' in proc.stderr, proc.stderr


def test_cli_shows_all_of_dds_error(cgroup_parent, deployment):
    """conv=fdatasync to /dev/null fails in fsync (the pv fallback's copier says which
    step failed; dd's last line only counts bytes)."""
    proc = as_root(cgroup_parent, deployment, 'copy', '/dev/zero', '/dev/null', '--size',
                   '1Mi', '--limit', '64Mi')
    assert proc.returncode == 1, proc.stderr
    assert 'fdatasync of /dev/null at byte 1048576 failed: Invalid argument' in proc.stderr, \
        proc.stderr
