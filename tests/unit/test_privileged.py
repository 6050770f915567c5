"""The privsep daemon's entrypoints validate every argument again.

oslo.rootwrap admits any ``privsep-helper`` command (tests/unit/test_rootwrap_filters.py),
so these checks, not the filters, keep a non-root caller to our own leaves and to
numeric limits on whole disks. They run here in-process, as the daemon runs them.
"""
from __future__ import annotations

import os
import sys

import pytest

from cinder_cgroup_throttle import privileged
from cinder_cgroup_throttle.exception import ThrottleError

LEAF = 'copy-4242-0123abcd'
P = 'cinder-volume-copy'


def controller():
    from cinder_cgroup_throttle.cgroups import detect
    host = detect()
    return 'blkio' if host.v1_blkio else 'io'


def a_disk():
    for name in sorted(os.listdir('/sys/block')):
        with open('/sys/block/%s/dev' % name) as f:
            return f.read().strip()
    raise AssertionError('no block device in /sys/block')


@pytest.mark.parametrize('args', [
    ('cpu', P, LEAF),  # another controller
    (None, P, LEAF),  # not a string
    ('blkio', '../etc', LEAF),
    ('blkio', '/', LEAF),
    ('blkio', P, '..'),
    ('blkio', P, 'system'),
    ('blkio', P, LEAF + '/x'),
    ('blkio', P, ['copy-1-00000000']),
])
def test_create_leaf_refuses(args):
    with pytest.raises(ThrottleError):
        privileged.create_leaf(*args, [])


@pytest.mark.parametrize('rows', [
    'not a list',
    [['7:0', '1', '0', '0']],  # a key missing
    [['7:0', '1', '0', '0', '0', '0']],  # one too many
    [['7:0', 1, '0', '0', '0']],  # not strings
    [['7:0', '-1', '0', '0', '0']],
    [['7:0', '1M', '0', '0', '0']],  # suffixes are silently truncated by v1
    [['7:0', '1.5', '0', '0', '0']],
    [['../7:0', '1', '0', '0', '0']],
    [['DISK', '1', '0', '0', '0']] * 17,  # too many rows
])
def test_limit_rows_refused(rows):
    if isinstance(rows, list):
        rows = [[a_disk() if v == 'DISK' else v for v in row] for row in rows]
    with pytest.raises(ThrottleError):
        privileged._limits(rows)


def test_a_whole_disk_row_is_accepted():
    limit, = privileged._limits([[a_disk(), '8388608', '0', '0', '0']])
    assert (limit.device.majmin, limit.rbps, limit.wbps) == (a_disk(), 8388608, 0)


def test_bad_limits_refused_before_the_leaf_is_made():
    parent = 'cct-none-%d' % os.getpid()
    with pytest.raises(ThrottleError, match='integer'):
        privileged.create_leaf(controller(), parent, LEAF, [[a_disk(), '1M', '0', '0', '0']])
    assert not os.path.exists(privileged._leaf_driver(controller(), parent, LEAF).parent_path)


def test_remove_refuses_a_non_boolean_kill():
    with pytest.raises(ThrottleError, match='kill'):
        privileged.try_remove_leaf(controller(), P, LEAF, 'yes')


def test_limits_of_a_leaf_that_does_not_exist():
    with pytest.raises(ThrottleError, match='no cgroup'):
        privileged.write_limits(controller(), 'cct-none-%d' % os.getpid(), LEAF, [], [])


# -- every call into root has a deadline and a named error --------------------------------
@pytest.fixture
def daemon_through(monkeypatch):
    """Start this package's privsep daemon through ``prefix`` (instead of the root helper);
    stop it afterwards."""
    from oslo_privsep import priv_context

    from cinder_cgroup_throttle import privsep

    def through(prefix):
        privsep.default.stop()
        monkeypatch.setattr(priv_context, '_HELPER_COMMAND_PREFIX', list(prefix))
        return privsep
    yield through
    privsep.default.stop()


def test_a_denied_daemon_start_is_a_named_error(daemon_through):
    from cinder_cgroup_throttle.exception import PrivilegedHelperError
    privsep = daemon_through(['false'])  # what a rootwrap that denies it amounts to
    with pytest.raises(PrivilegedHelperError, match='did not start.*exited 1'):
        privsep.try_remove_leaf(controller(), P, LEAF, False)


def test_a_hanging_daemon_start_times_out(daemon_through, monkeypatch):
    from cinder_cgroup_throttle.exception import PrivilegedTimeout
    privsep = daemon_through(['sh', '-c', 'sleep 30', 'sh'])  # e.g. sudo waiting for input
    monkeypatch.setattr(privsep, 'START_TIMEOUT', 0.5)
    with pytest.raises(PrivilegedTimeout, match='took more than 0.5 s'):
        privsep.try_remove_leaf(controller(), P, LEAF, False)
    assert privsep.default.channel is None  # the next call tries again


def our_daemons():
    """Our privsep daemons (started by this process, so in its process group), newest
    first."""
    found = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open('/proc/%s/cmdline' % pid, 'rb') as f:
                argv = f.read().split(b'\0')
            if (b'cinder_cgroup_throttle.privsep.default' in argv
                    and os.getpgid(int(pid)) == os.getpgid(0)):
                with open('/proc/%s/stat' % pid) as f:
                    started = int(f.read().rsplit(')', 1)[1].split()[19])
                found.append((started, int(pid)))
        except (OSError, ProcessLookupError):
            pass
    return [pid for _started, pid in sorted(found, reverse=True)]


@pytest.mark.kernel
def test_a_call_that_outlives_its_deadline_is_a_named_error(daemon_through, monkeypatch,
                                                            kernel_ready):
    import signal

    from cinder_cgroup_throttle.exception import PrivilegedTimeout
    # We are root: the daemon starts without a root helper.
    privsep = daemon_through(['env', 'PATH=%s:%s' % (os.path.dirname(sys.executable),
                                                     os.environ['PATH'])])
    gone, killed = privsep.try_remove_leaf(controller(), P, LEAF, False)
    assert gone and not killed
    daemon = our_daemons()[0]
    monkeypatch.setattr(privsep.default, 'timeout', 0.5)
    os.kill(daemon, signal.SIGSTOP)  # a daemon that does not answer
    try:
        with pytest.raises(PrivilegedTimeout, match='did not finish within 0.5 s'):
            privsep.try_remove_leaf(controller(), P, LEAF, False)
    finally:
        os.kill(daemon, signal.SIGCONT)
    gone, killed = privsep.try_remove_leaf(controller(), P, LEAF, False)  # and recovers
    assert gone and not killed


@pytest.mark.kernel
@pytest.mark.filterwarnings('ignore::pytest.PytestUnhandledThreadExceptionWarning')
def test_a_daemon_that_dies_fails_its_call_and_is_replaced(daemon_through, monkeypatch,
                                                           kernel_ready):
    import signal
    import threading

    from cinder_cgroup_throttle.exception import PrivilegedHelperError
    privsep = daemon_through(['env', 'PATH=%s:%s' % (os.path.dirname(sys.executable),
                                                     os.environ['PATH'])])
    privsep.try_remove_leaf(controller(), P, LEAF, False)
    daemon = our_daemons()[0]
    # Killed with the request unread, the daemon resets the connection: privsep's reader
    # thread dies without failing the call, which then ends at its deadline.
    monkeypatch.setattr(privsep.default, 'timeout', 2.0)
    os.kill(daemon, signal.SIGSTOP)  # the call is in flight when the daemon dies
    errors = []

    def call():
        try:
            privsep.try_remove_leaf(controller(), P, LEAF, False)
        except Exception as exc:  # reported below
            errors.append(exc)
    caller = threading.Thread(target=call)
    caller.start()
    caller.join(0.3)
    os.kill(daemon, signal.SIGKILL)
    caller.join(10)
    assert not caller.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], PrivilegedHelperError), errors
    assert 'privsep daemon gone' in str(errors[0])
    gone, killed = privsep.try_remove_leaf(controller(), P, LEAF, False)  # a new daemon
    assert gone and not killed
    assert our_daemons()[0] != daemon
