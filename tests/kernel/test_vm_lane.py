"""What only the VM lane has: pure cgroup v2, device-mapper, kernel-parsed partition tables.

Run with ``tools/run-vm-tests.sh PYTHON``; on the host these tests are deselected
(``-m "not vm"``). Each copy prints its achieved/limit ratio (see it with ``-s``).
"""
from __future__ import annotations

import os
import subprocess

import pytest

from cinder_cgroup_throttle.cgroups import detect, get_driver
from cinder_cgroup_throttle.cgroups.io_v2 import IoV2Driver
from cinder_cgroup_throttle.exception import CgroupOperationError
from tests.kernel.test_cgroup_copy import assert_rate
from tests.scratch import (MiB, fill_random, leaf_device_bytes, majmin, run,
                           sha256_prefix, timed)

pytestmark = [pytest.mark.vm, pytest.mark.kernel]

RATE = 8 * MiB
SIZE = 24 * MiB


def throttled_dd(manager, src: str, dst: str, size: int = SIZE, rate: int = RATE,
                 bs: str = '1M', oflag: str = 'direct') -> dict:
    """Copy like Cinder's copy_volume in a per-copy cgroup; return what the leaf showed.
    The rate is dd's own clock: under emulation a sampling thread in the guest sees the
    counters too seldom (steps of 8 MiB at 8 MiB/s, measured) to fit a slope."""
    with manager.copy(src, dst, rate) as copy:
        leaf = manager.driver.leaf_path(copy.id)
        argv = copy.prefix + ['dd', 'if=%s' % src, 'of=%s' % dst, 'count=%d' % size,
                              'bs=%s' % bs, 'iflag=count_bytes,direct']
        argv += ['oflag=%s' % oflag] if oflag else []
        seconds = timed(argv)
        seen = {'copy': copy, 'ratio': size / seconds / rate,
                'io.max': open(os.path.join(leaf, 'io.max')).read(),
                'io_bytes': leaf_device_bytes(leaf)}  # read here, not by the driver
    assert not os.path.exists(leaf)
    print('%s -> %s bs=%s: achieved/limit %.3f' % (src, dst, bs, seen['ratio']))
    return seen


def test_cgroup_hierarchy_is_pure_v2():
    mounts = []
    for line in open('/proc/self/mountinfo'):
        fields = line.split()
        fstype = fields[fields.index('-') + 1]
        if fstype.startswith('cgroup'):
            mounts.append((fstype, fields[4]))
    assert mounts == [('cgroup2', '/sys/fs/cgroup')]
    host = detect()
    assert (host.layout, host.v2_root, host.v1_blkio) == ('unified', '/sys/fs/cgroup', None)
    assert isinstance(get_driver('cct-probe', host), IoV2Driver)


def test_parent_inside_the_callers_busy_cgroup_fails_clearly():
    own = open('/proc/self/cgroup').read().split('::', 1)[1].strip()
    assert own != '/', 'the lane must run tests outside the exempt root cgroup'
    driver = get_driver('%s/cct-copies-%d' % (own.strip('/'), os.getpid()))
    with pytest.raises(CgroupOperationError, match='it holds processes'):
        driver.create_leaf('copy-1-00000000')
    assert not os.path.exists(driver.parent_path)


def test_io_max_is_written_for_the_leaf_and_dd_runs_in_it(scratch, manager):
    src, dst = scratch.loop(48), scratch.loop(48)
    digest = fill_random(src, SIZE)
    driver = manager.driver
    with manager.copy(src, dst, RATE) as copy:
        leaf = driver.leaf_path(copy.id)
        assert open(os.path.join(leaf, 'io.max')).read() == (
            '%s rbps=max wbps=%d riops=max wiops=max\n' % (majmin(dst), RATE))
        enabled = open(os.path.join(driver.parent_path, 'cgroup.subtree_control')).read()
        assert set(enabled.split()) >= {'io', 'memory'}
        # The prefix must put the copy itself (not cgexec's parent) into the leaf.
        proc = subprocess.Popen(copy.prefix + ['sh', '-c', 'cat /proc/self/cgroup; exec dd '
                                               'if=%s of=%s bs=1M count=%d iflag=direct '
                                               'oflag=direct status=none'
                                               % (src, dst, SIZE // MiB)],
                                stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate()
        assert proc.returncode == 0
        assert out == '0::/%s/%s\n' % (manager.cgroup_name, copy.id)
        _, written = leaf_device_bytes(leaf)[majmin(dst)]
        assert written >= SIZE
    assert not os.path.exists(leaf)
    assert sha256_prefix(dst, SIZE) == digest


def test_copy_to_dm_linear_device_is_throttled(scratch, manager):
    src, backing = scratch.loop(48), scratch.loop(48)
    dst = scratch.dm_linear(backing)
    assert os.major(os.stat(dst).st_rdev) != os.major(os.stat(backing).st_rdev)
    digest = fill_random(src, SIZE)
    seen = throttled_dd(manager, src, dst)
    assert seen['copy'].dst_dev.majmin == majmin(dst)
    assert seen['copy'].dst_dev.name.startswith('dm-')
    assert seen['io.max'].startswith('%s rbps=max wbps=%d ' % (majmin(dst), RATE))
    assert sha256_prefix(backing, SIZE) == digest
    assert_rate(seen['ratio'])


def test_copy_from_dm_linear_device_to_tmpfs_limits_dm_reads(scratch, manager):
    src = scratch.dm_linear(scratch.loop(48))
    dst = os.path.join(scratch.tmpfs(64), 'image.raw')
    digest = fill_random(src, SIZE)
    seen = throttled_dd(manager, src, dst, bs='4M', oflag='')  # tmpfs has no O_DIRECT
    assert seen['io.max'] == '%s rbps=%d wbps=max riops=max wiops=max\n' % (majmin(src), RATE)
    assert seen['io_bytes'][majmin(src)][0] >= SIZE
    assert sha256_prefix(dst, SIZE) == digest
    assert_rate(seen['ratio'])


def test_copy_between_kernel_parsed_partitions(scratch, manager):
    disk = scratch.loop(96, partscan=True)
    # sfdisk re-reads the table itself: the kernel's parser must create the partitions.
    run('sfdisk', '-q', disk, input='label: dos\n,40MiB\n,40MiB\n')
    name = os.path.basename(disk)
    for n in (1, 2):
        assert os.path.exists('/sys/block/%s/%sp%d/partition' % (name, name, n))
    p1, p2 = disk + 'p1', disk + 'p2'
    digest = fill_random(p1, SIZE)
    seen = throttled_dd(manager, p1, p2)
    assert seen['io.max'].startswith('%s rbps=max wbps=%d ' % (majmin(disk), RATE))
    assert majmin(p2) not in seen['io.max']
    assert sha256_prefix(p2, SIZE) == digest
    assert_rate(seen['ratio'])
