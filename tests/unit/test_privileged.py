"""The privsep daemon's entrypoints validate every argument again.

oslo.rootwrap admits any ``privsep-helper`` command (tests/unit/test_rootwrap_filters.py),
so these checks, not the filters, keep a non-root caller to our own leaves and to
numeric limits on whole disks. They run here in-process, as the daemon runs them.
"""
from __future__ import annotations

import os

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
    pytest.skip('no block device in /sys/block')


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
        privileged.create_leaf(*args)


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


def test_remove_refuses_a_non_boolean_kill():
    with pytest.raises(ThrottleError, match='kill'):
        privileged.try_remove_leaf(controller(), P, LEAF, 'yes')


def test_limits_of_a_leaf_that_does_not_exist():
    with pytest.raises(ThrottleError, match='no cgroup'):
        privileged.write_limits(controller(), 'cct-none-%d' % os.getpid(), LEAF, [], [])
