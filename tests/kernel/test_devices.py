"""Device resolution on real devices and filesystems."""
from __future__ import annotations

import os

import pytest

from cinder_cgroup_throttle import devices
from cinder_cgroup_throttle.exception import DeviceResolutionError

pytestmark = pytest.mark.kernel


def majmin(dev: str) -> str:
    st = os.stat(dev)
    return '%d:%d' % (os.major(st.st_rdev), os.minor(st.st_rdev))


def test_loop_device_resolves_to_itself(scratch):
    dev = scratch.loop(16)
    found = devices.resolve(dev)
    assert found.majmin == majmin(dev)
    assert found.name == os.path.basename(dev)


def test_symlink_is_followed(scratch):
    dev = scratch.loop(16)
    link = os.path.join(scratch.dir, 'by-path-link')
    os.symlink(dev, link)
    assert devices.resolve(link).majmin == majmin(dev)


def test_partition_resolves_to_parent_disk(scratch):
    disk, parts = scratch.partitioned_loop(96, (40, 40))
    for part in parts:
        assert majmin(part) != majmin(disk)
        assert devices.resolve(part).majmin == majmin(disk)


def test_file_on_ext4_resolves_to_its_disk(scratch):
    dev = scratch.loop(64)
    mnt = scratch.mkfs_mount(dev, 'ext4')
    path = os.path.join(mnt, 'volume.img')
    open(path, 'wb').close()
    assert devices.resolve(path).majmin == majmin(dev)


def test_file_on_ext4_on_a_partition_resolves_to_the_disk(scratch):
    disk, (part, _) = scratch.partitioned_loop(96, (64, 24))
    mnt = scratch.mkfs_mount(part, 'ext4')
    path = os.path.join(mnt, 'f')
    open(path, 'wb').close()
    assert devices.resolve(path).majmin == majmin(disk)


def test_file_on_btrfs_resolves_through_mountinfo(scratch):
    dev = scratch.loop(160)  # mkfs.btrfs wants >= 109 MiB
    mnt = scratch.mkfs_mount(dev, 'btrfs')
    path = os.path.join(mnt, 'f')
    open(path, 'wb').close()
    assert os.major(os.stat(path).st_dev) == 0  # anonymous device number
    assert devices.resolve(path).majmin == majmin(dev)


def test_tmpfs_file_and_char_device_have_no_device(scratch):
    mnt = scratch.tmpfs(8)
    path = os.path.join(mnt, 'f')
    open(path, 'wb').close()
    assert devices.resolve(path) is None
    assert devices.resolve('/dev/zero') is None


def test_missing_destination_uses_its_directory(scratch):
    dev = scratch.loop(64)
    mnt = scratch.mkfs_mount(dev, 'ext4')
    assert devices.resolve(os.path.join(mnt, 'new.img'), must_exist=False).majmin == majmin(dev)


def test_missing_source_is_a_clear_error(scratch):
    missing = os.path.join(scratch.dir, 'nope')
    with pytest.raises(DeviceResolutionError, match='nope does not exist'):
        devices.resolve(missing)
    with pytest.raises(DeviceResolutionError, match='neither'):
        devices.resolve(os.path.join(missing, 'x'), must_exist=False)


def test_fifo_is_refused(scratch):
    fifo = os.path.join(scratch.dir, 'fifo')
    os.mkfifo(fifo)
    with pytest.raises(DeviceResolutionError, match='neither a block device'):
        devices.resolve(fifo)
