"""etc/rootwrap.d/cinder-cgroup-throttle.filters admits our commands and nothing else.

Filters are loaded with oslo.rootwrap's own loader and checked with its own ``match_filter``,
together with Cinder's leaf filters for dd, qemu-img and ionice (from the installed Cinder's
volume.filters). The allowed side is not hand-written: real copies run through Cinder's
copy code with every command executed by the real ``cinder-rootwrap`` under these filters,
and the commands are recorded as they went through.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from oslo_rootwrap import wrapper

from cinder_cgroup_throttle.manager import DEFAULT_CGROUP, CopyManager
from cinder_cgroup_throttle.registry import Registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OURS = os.path.join(ROOT, 'etc', 'rootwrap.d', 'cinder-cgroup-throttle.filters')
BIN = os.path.dirname(sys.executable)
SYSTEM_DIRS = ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin']
EXEC_DIRS = [BIN] + SYSTEM_DIRS  # a venv: its bin must be listed (it need not be on PATH)
# Console scripts this package's commands name (rootwrap finds them through exec_dirs).
SCRIPTS = ('cinder-cgroup-throttle-pipe', 'privsep-helper')
CINDER_LEAVES = ('dd', 'qemu-img', 'qemu-img_convert', 'ionice_1', 'ionice_2')
LEAF = 'copy-4242-0123abcd'
P = DEFAULT_CGROUP
PIPE = ['cinder-cgroup-throttle-pipe', '--id', LEAF, '--rate', '8388608', '--state-dir',
        '/run/cinder-cgroup-throttle', '--']
CGEXEC = ['cgexec', '-g', 'blkio:%s/%s' % (P, LEAF)]
DD = ['dd', 'if=/dev/loop1', 'of=/dev/loop2', 'count=25165824', 'bs=1M',
      'iflag=count_bytes,direct', 'oflag=direct']
PRIVSEP = ['privsep-helper', '--privsep_context', 'cinder_cgroup_throttle.privsep.default',
           '--privsep_sock_path', '/tmp/tmpa1b2_c3d/privsep.sock']
CONF = ['--config-file', '/etc/cinder/cinder.conf']


def cinder_volume_filters() -> str:
    path = os.path.join(sys.prefix, 'etc', 'cinder', 'rootwrap.d', 'volume.filters')
    # Installed with cinder (requirements.txt): missing, it is a broken install, not a skip.
    assert os.path.exists(path), 'Cinder\'s volume.filters is not installed at %s' % path
    return path


def cinder_leaf_lines() -> str:
    """Cinder's own dd, qemu-img and ionice lines, verbatim."""
    with open(cinder_volume_filters()) as f:
        lines = [line for line in f
                 if line.split(':', 1)[0].strip() in CINDER_LEAVES]
    assert len(lines) == len(CINDER_LEAVES), lines
    return ''.join(lines)


def write_filters(directory: str, parent: str = P) -> str:
    """Our file as an operator installs it (parent renamed as deployment.md says) plus
    Cinder's leaf filters."""
    os.makedirs(directory, exist_ok=True)
    with open(OURS) as f:
        ours = f.read()
    with open(os.path.join(directory, 'cinder-cgroup-throttle.filters'), 'w') as f:
        f.write(ours.replace(DEFAULT_CGROUP, parent))
    with open(os.path.join(directory, 'cinder-leaves.filters'), 'w') as f:
        f.write('[Filters]\n' + cinder_leaf_lines())
    return directory


@pytest.fixture(scope='module')
def filters(tmp_path_factory):
    return wrapper.load_filters([write_filters(str(tmp_path_factory.mktemp('filters')))])


def verdict(filter_list, argv, exec_dirs=EXEC_DIRS):
    """The name of the filter that admits argv, or None (rootwrap denies it)."""
    try:
        return wrapper.match_filter(filter_list, list(argv), exec_dirs=exec_dirs).name
    except wrapper.NoFilterMatched:
        return None


def system_layout(directory: str) -> list:
    """exec_dirs of a system install: our console scripts in <directory>/usr/local/bin (a
    root-owned copy of what pip wrote), the venv's bin nowhere."""
    bindir = os.path.join(directory, 'usr', 'local', 'bin')
    os.makedirs(bindir, exist_ok=True)
    for name in SCRIPTS:
        shutil.copy2(os.path.join(BIN, name), os.path.join(bindir, name))
    return [bindir] + SYSTEM_DIRS


@pytest.fixture(scope='module', params=['venv', 'system'])
def exec_dirs(request, tmp_path_factory):
    if request.param == 'venv':
        return EXEC_DIRS
    return system_layout(str(tmp_path_factory.mktemp('system')))


# -- what we generate is admitted (shapes of Cinder's argv; the real runs are below) -------
GENERATED = [
    CGEXEC + DD,
    CGEXEC + ['ionice', '-c3'] + DD,
    CGEXEC + ['ionice', '-c2', '-n7'] + DD,
    ['cgexec', '-g', 'io:%s/%s' % (P, LEAF)] + DD[:-1] + ['conv=fdatasync,sparse'],
    CGEXEC + ['qemu-img', 'convert', '-O', 'raw', '-t', 'none', '-f', 'qcow2', '/a', '/dev/x'],
    PIPE + DD,
    PIPE + ['ionice', '-c3'] + DD[:-1] + ['conv=fdatasync'],
    PIPE + ['qemu-img', 'convert', '-O', 'raw', '/var/lib/cinder/conversion/img', '/dev/x'],
    PRIVSEP,
    PRIVSEP[:1] + CONF + PRIVSEP[1:],
    PRIVSEP[:1] + CONF + ['--config-file', '/etc/cinder/cinder-volume.conf'] + PRIVSEP[1:],
    # inside a delegated cinder-volume unit (cgroups.placement)
    ['cgexec', '-g', 'io:system.slice/cinder-volume.service/%s/%s' % (P, LEAF)] + DD,
    ['cgexec', '-g', 'io:system.slice/openstack-cinder-volume.service/%s/%s' % (P, LEAF)]
    + ['ionice', '-c3'] + DD,
]


@pytest.mark.parametrize('argv', GENERATED, ids=lambda a: ' '.join(a[:1] + a[3:5]))
def test_generated_shapes_are_admitted_by_our_filters(filters, argv, exec_dirs):
    assert (verdict(filters, argv, exec_dirs) or '').startswith('cct_'), argv


@pytest.mark.parametrize('argv', GENERATED, ids=lambda a: ' '.join(a[:1] + a[3:5]))
def test_a_trailing_newline_in_any_argument_is_denied(filters, argv):
    """rootwrap appends "$" to each pattern, which matches before a final newline. (Any
    privsep-helper command passes rootwrap's own built-in filter, never one of ours.)"""
    for i in range(len(argv)):
        bad = argv[:i] + [argv[i] + '\n'] + argv[i + 1:]
        assert verdict(filters, bad) in (None, 'privsep-helper'), bad
        assert verdict(filters, bad) is None or argv[0] == 'privsep-helper', bad


# -- hostile commands are denied --------------------------------------------------------
def _cg(group):
    return ['cgexec', '-g', group]


HOSTILE = {
    'other controller cpu': _cg('cpu:%s/%s' % (P, LEAF)) + DD,
    'other controller memory': _cg('memory:%s/%s' % (P, LEAF)) + DD,
    'two controllers in one -g': _cg('blkio,cpu:%s/%s' % (P, LEAF)) + DD,
    'other cgroup': _cg('blkio:other/%s' % LEAF) + DD,
    'root cgroup': _cg('blkio:/') + DD,
    'root cgroup, empty path': _cg('blkio:') + DD,
    'the parent itself': _cg('blkio:%s' % P) + DD,
    'another unit': _cg('io:system.slice/ssh.service/%s/%s' % (P, LEAF)) + DD,
    'the unit itself': _cg('io:system.slice/cinder-volume.service/%s' % LEAF) + DD,
    'the service\'s own leaf': _cg('io:system.slice/cinder-volume.service/main') + DD,
    'leaf not a copy id': _cg('blkio:%s/system' % P) + DD,
    '.. to escape the parent': _cg('blkio:%s/../%s' % (P, LEAF)) + DD,
    '.. after the leaf': _cg('blkio:%s/%s/..' % (P, LEAF)) + DD,
    'nested below a leaf': _cg('blkio:%s/%s/x' % (P, LEAF)) + DD,
    'extra -g option': CGEXEC + ['-g', 'cpu:/'] + DD,
    'extra --sticky option': CGEXEC + ['--sticky'] + DD,
    'cgexec sh': CGEXEC + ['sh', '-c', 'id'],
    'cgexec bash': CGEXEC + ['bash', '-c', 'id'],
    'cgexec cat': CGEXEC + ['cat', '/etc/shadow'],
    'cgexec cp': CGEXEC + ['cp', '/etc/shadow', '/tmp/x'],
    'cgexec python': CGEXEC + ['python3', '-c', 'import os'],
    'cgexec ionice sh': CGEXEC + ['ionice', '-c3', 'sh'],
    'cgexec pv reads a file': CGEXEC + ['pv', '/etc/shadow'],
    'cgexec qemu-img info': CGEXEC + ['qemu-img', 'info', '/etc/shadow'],
    'cgexec dd with skip=': CGEXEC + DD + ['skip=1'],
    'cgexec dd without count': CGEXEC + ['dd', 'if=/etc/shadow', 'of=/tmp/x'],
    'wrapper sh': PIPE + ['sh', '-c', 'id'],
    'wrapper bash': PIPE + ['bash', '-c', 'id'],
    'wrapper cat': PIPE + ['cat', '/etc/shadow'],
    'wrapper cp': PIPE + ['cp', '/etc/shadow', '/tmp/x'],
    'wrapper python': PIPE + ['python3', '-c', 'import os'],
    'wrapper pv reads a file': PIPE + ['pv', '/etc/shadow'],
    'wrapper ionice sh': PIPE + ['ionice', '-c3', 'sh'],
    'wrapper without --': PIPE[:-1] + DD,
    'wrapper bad id': ['cinder-cgroup-throttle-pipe', '--id', '../x'] + PIPE[3:] + DD,
    'wrapper .. in state dir': PIPE[:6] + ['/run/../etc', '--'] + DD,
    'wrapper relative state dir': PIPE[:6] + ['etc', '--'] + DD,
    'wrapper zero rate': PIPE[:4] + ['0'] + PIPE[5:] + DD,
    'wrapper extra option': PIPE[:-1] + ['--debug', '--'] + DD,
    'pv reads a file': ['pv', '/etc/shadow'],
    'pv -R': ['pv', '-R', '1', '-L', '1'],
    'cgset non-throttle key': ['cgset', '-r', 'cpu.shares=2', '%s/%s' % (P, LEAF)],
    'cgset blkio.weight': ['cgset', '-r', 'blkio.weight=1000', '%s/%s' % (P, LEAF)],
    'cgset throttle key of other cgroup': [
        'cgset', '-r', 'blkio.throttle.read_bps_device=7:0 1', 'system'],
    'cgcreate other cgroup': ['cgcreate', '-g', 'blkio:/other'],
    'cgdelete parent': ['cgdelete', '-g', 'blkio:%s' % P],
    'the old priv helper': ['cinder-cgroup-throttle-priv', 'create-leaf', 'blkio', P, LEAF],
    'ionice sh (Cinder ionice chain)': ['ionice', '-c3', 'sh'],
}


@pytest.mark.parametrize('name', sorted(HOSTILE))
def test_hostile_command_is_denied(filters, name, exec_dirs):
    assert verdict(filters, HOSTILE[name], exec_dirs) is None, HOSTILE[name]


# oslo.rootwrap itself appends "privsep-helper: CommandFilter" to every filter list: any
# privsep-helper command passes rootwrap. The boundary is therefore the daemon's own
# validation of every argument (tests/unit/test_privileged.py); our lines name the shape.
PRIVSEP_OTHER = {
    'other context': PRIVSEP[:2] + ['os_brick.privileged.default'] + PRIVSEP[3:],
    'context as a regexp': PRIVSEP[:2] + ['cinder_cgroup_throttleXprivsep.default']
    + PRIVSEP[3:],
    'config outside /etc': PRIVSEP[:1] + ['--config-file', '/tmp/x.conf'] + PRIVSEP[1:],
    'config /etc/..': PRIVSEP[:1] + ['--config-file', '/etc/../tmp/x.conf'] + PRIVSEP[1:],
    'config /etc/cinder/../..': PRIVSEP[:1] + ['--config-file', '/etc/cinder/../../x.conf']
    + PRIVSEP[1:],
    'three config files': PRIVSEP[:1] + CONF * 3 + PRIVSEP[1:],
    'config dir': PRIVSEP[:1] + ['--config-dir', '/etc/cinder'] + PRIVSEP[1:],
    'socket outside /tmp': PRIVSEP[:4] + ['/run/x/privsep.sock'],
    'socket ..': PRIVSEP[:4] + ['/tmp/../run/privsep.sock'],
    'extra argument': PRIVSEP + ['--debug'],
}


@pytest.mark.parametrize('name', sorted(PRIVSEP_OTHER))
def test_rootwrap_admits_any_privsep_helper_but_not_as_ours(filters, name, exec_dirs):
    assert verdict(filters, PRIVSEP_OTHER[name], exec_dirs) == 'privsep-helper'


def test_cinder_own_cgexec_line_is_what_must_be_replaced():
    """Why deployment.md replaces it: Cinder's line admits the root cgroup and '..', and
    denies ionice together with the throttle."""
    cinder = wrapper.load_filters([os.path.dirname(cinder_volume_filters())])
    assert verdict(cinder, _cg('blkio:/') + DD) == 'cgexec'
    assert verdict(cinder, _cg('blkio:%s/../x' % P) + DD) == 'cgexec'
    assert verdict(cinder, CGEXEC + ['ionice', '-c3'] + DD) is None


# -- real runs: every command our code generated went through the real cinder-rootwrap ---
@pytest.fixture
def rootwrap(tmp_path, cgroup_parent, exec_dirs):
    """A root helper that records each command and runs it through the real cinder-rootwrap
    with a rootwrap.conf over our filters (parent renamed to the session's) + Cinder's, in
    one install layout."""
    filters_dir = write_filters(str(tmp_path / 'rootwrap.d'), cgroup_parent)
    conf = tmp_path / 'rootwrap.conf'
    conf.write_text('[DEFAULT]\nfilters_path=%s\nexec_dirs=%s\nuse_syslog=False\n'
                    % (filters_dir, ','.join(exec_dirs)))
    log = tmp_path / 'commands'
    helper = tmp_path / 'root-helper'
    rootwrap = os.path.join(BIN, 'cinder-rootwrap')
    helper.write_text('#!/bin/sh\nprintf "%%s\\0" "$@" >> %s\necho >> %s\n'
                      'exec %s %s "$@"\n' % (log, log, rootwrap, conf))
    helper.chmod(0o755)

    def execute(*cmd, **kwargs):
        proc = subprocess.run([str(helper)] + list(cmd), capture_output=True, text=True)
        if proc.returncode:
            raise AssertionError('rootwrap refused or failed (%d): %s: %s'
                                 % (proc.returncode, cmd, proc.stderr))
        return proc.stdout, proc.stderr

    def recorded():
        lines = log.read_text().splitlines() if log.exists() else []
        return [line.split('\0')[:-1] for line in lines]

    return [str(helper)], execute, recorded, filters_dir


@pytest.fixture
def privsep_through(monkeypatch):
    """Start this package's privsep daemon through ``helper`` (as cinder-volume's
    priv_context.init(root_helper) does), and stop it afterwards."""
    from oslo_privsep import priv_context

    from cinder_cgroup_throttle import privsep

    def through(helper):
        privsep.default.stop()
        monkeypatch.setattr(priv_context, '_HELPER_COMMAND_PREFIX', list(helper))
    yield through
    privsep.default.stop()


@pytest.mark.kernel
@pytest.mark.cinder
@pytest.mark.parametrize('backend', ['cgroup', 'pv'])
@pytest.mark.parametrize('ionice', [None, '-c3'])
def test_real_copies_pass_rootwrap(scratch, cgroup_parent, state_dir, rootwrap, backend,
                                   ionice, exec_dirs, privsep_through, monkeypatch):
    from cinder.image import image_utils
    from cinder.volume import volume_utils

    from cinder_cgroup_throttle.cgroups import get_driver
    from cinder_cgroup_throttle.privileged import PRIVSEP
    from cinder_cgroup_throttle.throttle import CgroupThrottle
    from tests.scratch import MiB, fill_random, sha256_prefix

    # A root process names the wrapper by its path unless PATH finds it; a non-root
    # service (simulated here) names it bare, as the filters expect.
    monkeypatch.setenv('PATH', BIN + os.pathsep + os.environ['PATH'])
    helper, execute, recorded, filters_dir = rootwrap
    # The privileged cgroup steps go through the privsep daemon, started through the same
    # rootwrap, as for a non-root service.
    privsep_through(helper)
    manager = CopyManager(cgroup_parent, grace=5, backend=backend, executor=PRIVSEP,
                          registry=Registry(state_dir))
    throttle = CgroupThrottle(8 * MiB, manager=manager)
    src, dst = scratch.loop(16), scratch.loop(16)
    digest = fill_random(src, 4 * MiB)
    volume_utils.copy_volume(src, dst, 4, '1M', execute=execute, ionice=ionice,
                             throttle=throttle)
    assert sha256_prefix(dst, 4 * MiB) == digest
    with throttle.subcommand(src, dst) as cmd:
        execute(*image_utils._get_qemu_convert_cmd(src, dst, out_format='raw',
                                                   src_format='raw', cache_mode='none',
                                                   prefix=tuple(cmd['prefix'])))
    assert sha256_prefix(dst, 4 * MiB) == digest
    assert get_driver(cgroup_parent).leaves() == []

    commands = recorded()
    kinds = [argv[0] for argv in commands]
    if backend == 'cgroup':  # one daemon for all steps of both copies
        assert sorted(set(kinds)) == ['cgexec', 'privsep-helper'], commands
        assert kinds.count('privsep-helper') == 1, commands
    else:
        assert set(kinds) == {'cinder-cgroup-throttle-pipe'}, commands
    filters = wrapper.load_filters([filters_dir])
    for argv in commands:
        assert (verdict(filters, argv, exec_dirs) or '').startswith('cct_'), argv
        if ionice and 'dd' in argv:
            assert argv[argv.index('dd') - 2:argv.index('dd')] == ['ionice', ionice]
