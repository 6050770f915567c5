"""Cinder's real copy paths run throttled through our default throttle."""
from __future__ import annotations

import os
import subprocess

import pytest

from cinder_cgroup_throttle.cgroups import get_driver
from tests.scratch import DeviceRateProbe, LeafRateProbe, MiB, fill_random, sha256_prefix

pytestmark = [pytest.mark.kernel, pytest.mark.cinder]

RATE = 8 * MiB
SIZE_MB = 24


LOW, HIGH = 0.97, 1.03  # the copy leaf's byte counter over 10-90 % of the copy


def assert_rate(probe, size, what, rate=RATE, low=LOW, block=MiB):
    """The one copy leaf counted ``size`` bytes (in the probe's direction), at ``rate``."""
    (leaf,) = probe.series
    # The copy ran in what the probe watched. Its last ``block`` may end with the
    # process or leaf before the next sample; completeness is checked elsewhere.
    assert probe.total(leaf) >= size - block, probe.series
    ratio = probe.rate(leaf, total=size) / rate
    print('%s: achieved/limit %.3f' % (what, ratio))
    assert low <= ratio <= HIGH, '%s: achieved/limit %.3f' % (what, ratio)


@pytest.mark.parametrize('kwargs', [{}, {'ionice': '-c3'}, {'sync': True}, {'sparse': True}],
                         ids=['plain', 'ionice', 'sync', 'sparse'])
def test_copy_volume_is_throttled(scratch, cinder_modules, install_throttle, cgroup_parent,
                                  kwargs):
    volume_utils = cinder_modules[2]
    install_throttle(RATE)
    src, dst = scratch.loop(32), scratch.loop(32)
    size = SIZE_MB * MiB
    digest = fill_random(src, size)
    with LeafRateProbe(cgroup_parent) as probe:
        volume_utils.copy_volume(src, dst, SIZE_MB, '1M', **kwargs)
    assert sha256_prefix(dst, size) == digest
    assert_rate(probe, size, 'copy_volume %s' % kwargs)
    assert get_driver(cgroup_parent).leaves() == []


def test_volume_wipe_from_dev_zero_is_throttled(scratch, cinder_modules, install_throttle,
                                                cgroup_parent):
    volume_utils = cinder_modules[2]
    install_throttle(RATE)
    dst = scratch.loop(32)
    fill_random(dst, 16 * MiB)
    with LeafRateProbe(cgroup_parent) as probe:
        volume_utils.copy_volume('/dev/zero', dst, 16, '1M', sync=True)
    assert_rate(probe, 16 * MiB, 'wipe from /dev/zero')
    assert sha256_prefix(dst, 16 * MiB) == sha256_prefix('/dev/zero', 16 * MiB)


def test_copy_volume_to_ext4_file(scratch, cinder_modules, install_throttle, cgroup_parent):
    volume_utils = cinder_modules[2]
    install_throttle(RATE)
    src = scratch.loop(32)
    mnt = scratch.mkfs_mount(scratch.loop(96), 'ext4')
    dst = os.path.join(mnt, 'backup.img')
    with open(dst, 'wb') as f:
        f.truncate(SIZE_MB * MiB)
    digest = fill_random(src, SIZE_MB * MiB)
    with LeafRateProbe(cgroup_parent) as probe:
        volume_utils.copy_volume(src, dst, SIZE_MB, '4M')
    # 4 MiB writes: the counter moves in few, large steps; measured 0.964-1.000 (load 7).
    assert_rate(probe, SIZE_MB * MiB, 'copy_volume to an ext4 file', low=0.95,
                block=4 * MiB)
    assert sha256_prefix(dst, SIZE_MB * MiB) == digest


@pytest.mark.parametrize('direction', ['file_to_volume', 'volume_to_new_file'])
def test_convert_image_raw_to_raw(scratch, cinder_modules, install_throttle, cgroup_parent,
                                  direction):
    image_utils = cinder_modules[3]
    install_throttle(RATE)
    volume = scratch.loop(SIZE_MB)  # qemu-img copies the whole device: size it to the data
    mnt = scratch.mkfs_mount(scratch.loop(96), 'ext4')
    image = os.path.join(mnt, 'image.raw')
    size = SIZE_MB * MiB
    if direction == 'file_to_volume':
        digest = fill_random(image, size)
        src, dst = image, volume
    else:
        digest = fill_random(volume, size)
        src, dst = volume, image  # qemu-img creates it: the throttle sees a missing path
        assert not os.path.exists(dst)
    if direction == 'file_to_volume':
        probe = LeafRateProbe(cgroup_parent)
    else:
        # The limit is on the source's reads (buffered writes to a new file escape v1).
        # Readahead's bios are counted by the leaf when queued, not when the throttle lets
        # them through: the source device's own completions are the rate the kernel allowed.
        probe = DeviceRateProbe(volume, write=False)
    with probe:
        image_utils.convert_image(src, dst, 'raw', src_format='raw')
    assert sha256_prefix(dst, size) == digest
    assert_rate(probe, size, 'convert_image ' + direction)


def test_failed_copy_leaves_nothing(scratch, cinder_modules, install_throttle, cgroup_parent):
    from oslo_concurrency import processutils
    volume_utils = cinder_modules[2]
    install_throttle(RATE)
    src, dst = scratch.loop(16), scratch.loop(8)
    with pytest.raises(processutils.ProcessExecutionError, match='No space left'):
        volume_utils.copy_volume(src, dst, 16, '1M')  # 16 MiB do not fit in 8 MiB
    assert get_driver(cgroup_parent).leaves() == []


def test_cgexec_runs_the_command_in_the_leaf(scratch, cinder_modules, install_throttle):
    throttling = cinder_modules[1]
    install_throttle(RATE)
    src, dst = scratch.loop(8), scratch.loop(8)
    with throttling.Throttle.get_default().subcommand(src, dst) as cmd:
        out = subprocess.run(cmd['prefix'] + ['cat', '/proc/self/cgroup'],
                             capture_output=True, text=True, check=True).stdout
        group = cmd['prefix'][2].split(':', 1)[1]
        assert any(line.endswith(':/' + group) for line in out.splitlines()), out
