"""Per-copy cgroups: created with the right limits, removed in every way a copy can end."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from cinder_cgroup_throttle.cgroups import get_driver
from cinder_cgroup_throttle.exception import DeviceResolutionError, ThrottleError
from cinder_cgroup_throttle.manager import CopyManager
from cinder_cgroup_throttle.registry import Registry
from cinder_cgroup_throttle.sharing import StaticLimits
from cinder_cgroup_throttle.throttle import CgroupThrottle
from tests.scratch import MiB, fill_random, timed

pytestmark = pytest.mark.kernel


def limit_lines(manager, copy_id):
    """The leaf's limits as the kernel reports them, '' when none."""
    path = manager.driver.leaf_path(copy_id)
    if manager.driver.controller == 'blkio':
        return ''.join(open(os.path.join(path, name)).read() for name in
                       ('blkio.throttle.read_bps_device', 'blkio.throttle.write_bps_device'))
    return open(os.path.join(path, 'io.max')).read()


def test_limit_lands_on_destination_writes_as_plain_integer(scratch, manager):
    src, dst = scratch.loop(16), scratch.loop(16)
    rate = 5 * MiB + 3  # odd value: proves no rounding or suffix
    with manager.copy(src, dst, rate) as copy:
        text = limit_lines(manager, copy.id)
        dst_mm = copy.dst_dev.majmin
        if manager.driver.controller == 'blkio':
            assert text.split() == [dst_mm, str(rate)]
        else:
            assert '%s rbps=max wbps=%d' % (dst_mm, rate) in text
        assert copy.prefix == ['cgexec', '-g', '%s:%s/%s' % (
            manager.driver.controller, manager.cgroup_name, copy.id)]


def test_no_destination_device_limits_source_reads(scratch, manager):
    src = scratch.loop(16)
    dst = os.path.join(scratch.tmpfs(8), 'out')
    with manager.copy(src, dst, 4 * MiB) as copy:
        text = limit_lines(manager, copy.id)
        assert copy.src_dev.majmin in text
        assert (str(4 * MiB) in text if manager.driver.controller == 'blkio'
                else 'rbps=%d wbps=max' % (4 * MiB) in text)


def test_leaf_removed_after_exception_in_body(scratch, manager):
    src, dst = scratch.loop(16), scratch.loop(16)
    with pytest.raises(RuntimeError):
        with manager.copy(src, dst, MiB) as copy:
            assert os.path.isdir(manager.driver.leaf_path(copy.id))
            raise RuntimeError('copy failed')
    assert not os.path.exists(manager.driver.leaf_path(copy.id))
    assert manager.registry.entries() == []


def start_in_leaf(manager, copy, src, dst, mib):
    """Start a slow dd through the copy's prefix; return once it runs inside the leaf."""
    proc = subprocess.Popen(copy.prefix + ['dd', 'if=' + src, 'of=' + dst, 'bs=1M',
                                           'count=%d' % mib, 'oflag=direct'],
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while not manager.driver.pids(copy.id) and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc


def test_leaf_removed_after_dd_is_killed(scratch, manager):
    src, dst = scratch.loop(32), scratch.loop(32)
    fill_random(src, 16 * MiB)
    with manager.copy(src, dst, MiB) as copy:
        proc = start_in_leaf(manager, copy, src, dst, 16)
        assert manager.driver.pids(copy.id) == [proc.pid]  # cgexec exec()ed dd in place
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not os.path.exists(manager.driver.leaf_path(copy.id))


def test_orphan_still_in_the_leaf_is_killed_and_leaf_removed(scratch, manager):
    src, dst = scratch.loop(32), scratch.loop(32)
    manager.grace = 0.5
    with manager.copy(src, dst, MiB) as copy:
        orphan = start_in_leaf(manager, copy, src, dst, 32)
    assert orphan.wait(timeout=10) == -signal.SIGKILL
    assert not os.path.exists(manager.driver.leaf_path(copy.id))


def test_missing_source_creates_nothing(scratch, manager):
    before = manager.driver.leaves()
    with pytest.raises(DeviceResolutionError, match='does not exist'):
        with manager.copy(os.path.join(scratch.dir, 'missing'), scratch.loop(8), MiB):
            pass
    assert manager.driver.leaves() == before


def test_cgroup_backend_refuses_a_copy_without_block_devices(scratch, manager):
    mnt = scratch.tmpfs(8)
    src = os.path.join(mnt, 'a')
    open(src, 'wb').close()
    with pytest.raises(ThrottleError, match='neither .* is on a block device'):
        with manager.copy(src, os.path.join(mnt, 'b'), MiB):
            pass


def test_nested_and_concurrent_copies_keep_their_own_limits(scratch, manager):
    devs = [scratch.loop(8) for _ in range(4)]
    with manager.copy(devs[0], devs[1], 2 * MiB) as outer:
        before = limit_lines(manager, outer.id)
        ids = []

        def inner(i):
            with manager.copy(devs[2], devs[3], (3 + i) * MiB) as copy:
                ids.append(copy.id)
                assert str((3 + i) * MiB) in limit_lines(manager, copy.id)
                time.sleep(0.2)

        threads = [threading.Thread(target=inner, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(ids)) == 8
        assert limit_lines(manager, outer.id) == before
    assert manager.driver.leaves() == []


def test_throttle_zero_limit_is_a_no_op(scratch):
    throttle = CgroupThrottle(0)
    with throttle.subcommand('/dev/zero', '/dev/null') as cmd:
        assert cmd == {'prefix': []}


def test_throttle_subcommand_yields_cgexec_prefix(scratch, cgroup_parent, state_dir):
    src, dst = scratch.loop(8), scratch.loop(8)
    throttle = CgroupThrottle('4Mi', cgroup_name=cgroup_parent)
    assert throttle  # Cinder uses `throttle or Throttle.get_default()`
    with throttle.subcommand(src, dst) as cmd:
        assert isinstance(cmd['prefix'], list)
        assert cmd['prefix'][:2] == ['cgexec', '-g']
        leaf = cmd['prefix'][2].rsplit('/', 1)[1]
        assert throttle.manager.driver.pids(leaf) == []
    assert leaf not in get_driver(cgroup_parent).leaves()


def test_throttle_takes_the_clis_and_options_settings_as_keywords(
        scratch, cgroup_parent, tmp_path):
    """Built like cinder.conf configures it, without a CopyManager by hand."""
    src, dst = scratch.loop(8), scratch.loop(8)
    state = str(tmp_path / 'state')
    throttle = CgroupThrottle(0, cgroup_name=cgroup_parent, backend='cgroup',
                              read_bps_limit='3Mi', host_bps_limit='16Mi', state_dir=state)
    assert throttle.manager.registry.directory == state
    with throttle.subcommand(src, dst) as cmd:
        leaf = cmd['prefix'][2].rsplit('/', 1)[1]
        # No own rate: the host cap's share on the destination, the static read limit.
        lines = limit_lines(throttle.manager, leaf)
        assert [n for n in os.listdir(state) if n.endswith('.json')] == [leaf + '.json']
    src_majmin, dst_majmin = ('%d:%d' % (os.major(os.stat(p).st_rdev),
                                         os.minor(os.stat(p).st_rdev)) for p in (src, dst))
    if throttle.manager.driver.controller == 'blkio':
        assert lines == '%s %d\n%s %d\n' % (src_majmin, 3 * MiB, dst_majmin, 16 * MiB)
    else:
        assert sorted(lines.splitlines()) == sorted([
            '%s rbps=%d wbps=max riops=max wiops=max' % (src_majmin, 3 * MiB),
            '%s rbps=max wbps=%d riops=max wiops=max' % (dst_majmin, 16 * MiB)])
    assert leaf not in get_driver(cgroup_parent).leaves()
    assert not [n for n in os.listdir(state) if n.endswith('.json')]
    with pytest.raises(ThrottleError, match='either manager or'):
        CgroupThrottle(MiB, manager=throttle.manager, backend='pv')
    with pytest.raises(ThrottleError, match='write_iops_limit'):
        CgroupThrottle(MiB, write_iops_limit=-1)


def test_file_destination_limits_source_reads(scratch, manager):
    # convert_image writes files through the page cache: the source's reads carry the limit.
    src = scratch.loop(16)
    mnt = scratch.mkfs_mount(scratch.loop(64), 'ext4')
    with manager.copy(src, os.path.join(mnt, 'upload.img'), 4 * MiB) as copy:
        assert copy.limits[0].device.majmin == copy.src_dev.majmin
        assert (copy.limits[0].rbps, copy.limits[0].wbps) == (4 * MiB, 0)


def test_file_to_file_on_one_filesystem_limits_its_disk(scratch, manager):
    dev = scratch.loop(64)
    mnt = scratch.mkfs_mount(dev, 'ext4')
    src = os.path.join(mnt, 'a.img')
    open(src, 'wb').close()
    with manager.copy(src, os.path.join(mnt, 'b.img'), 4 * MiB) as copy:
        assert copy.limits[0].device.name == os.path.basename(dev)
        assert copy.limits[0].rbps == 4 * MiB


@pytest.mark.parametrize('preexisting', [False, True], ids=['created', 'found'])
def test_parent_cgroup_is_removed_only_if_the_manager_created_it(scratch, state_dir,
                                                                 preexisting):
    name = 'cct-test-parent-%d' % os.getpid()
    mgr = CopyManager(name, backend='cgroup', registry=Registry(state_dir))
    parent = mgr.driver.parent_path
    try:
        if preexisting:
            mgr.driver.ensure_parent()  # as Cinder's own BlkioCgroup or an operator would
        src, dst = scratch.loop(8), scratch.loop(8)
        with mgr.copy(src, dst, MiB):
            with mgr.copy(src, dst, MiB):
                pass
            assert os.path.isdir(parent)  # the outer copy's leaf is still in it
        assert os.path.isdir(parent) == preexisting
    finally:
        if os.path.isdir(parent):
            os.rmdir(parent)


def test_relimit_keeps_the_direction_of_a_file_destination(scratch, manager):
    # Block device -> file: the limit is on the source's reads, also after a re-limit.
    src = scratch.loop(16)
    mnt = scratch.mkfs_mount(scratch.loop(64), 'ext4')
    with manager.copy(src, os.path.join(mnt, 'image.raw'), 4 * MiB) as copy:
        manager.set_limit(copy.id, 6 * MiB)
        path = manager.driver.leaf_path(copy.id)
        if manager.driver.controller == 'blkio':
            reads = open(os.path.join(path, 'blkio.throttle.read_bps_device')).read()
            writes = open(os.path.join(path, 'blkio.throttle.write_bps_device')).read()
            assert reads.split() == [copy.src_dev.majmin, str(6 * MiB)]
            assert writes.strip() == ''
        else:
            assert ('%s rbps=%d wbps=max' % (copy.src_dev.majmin, 6 * MiB)
                    in open(os.path.join(path, 'io.max')).read())


def test_no_rate_and_no_applicable_limit_runs_unthrottled(scratch, cgroup_parent, state_dir):
    # Only a read limit configured, and the source is /dev/zero: nothing to throttle, and
    # nothing was asked for the copy as a whole, so it runs as configured: without a limit.
    mgr = CopyManager(cgroup_parent, backend='auto', registry=Registry(state_dir),
                      static=StaticLimits(read_bps=MiB))
    dst = scratch.loop(8)
    with mgr.copy('/dev/zero', dst, 0) as copy:
        assert (copy.backend, copy.prefix) == ('none', [])
        timed(['dd', 'if=/dev/zero', 'of=' + dst, 'bs=1M', 'count=4', 'oflag=direct'])
    assert mgr.registry.entries() == []
