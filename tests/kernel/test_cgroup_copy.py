"""Real copies through per-copy cgroups: bytes verified, rate by dd's own clock."""
from __future__ import annotations

import os
import threading

import pytest

from tests.scratch import MiB, fill_random, sha256_prefix, timed

pytestmark = pytest.mark.kernel

RATE = 8 * MiB


def dd_argv(prefix, src, dst, size, bs, iflag_direct=True, oflag_direct=True):
    """The argv Cinder's volume_utils.copy_volume builds."""
    argv = list(prefix) + ['dd', 'if=%s' % src, 'of=%s' % dst, 'count=%d' % size,
                           'bs=%s' % bs,
                           'iflag=count_bytes,direct' if iflag_direct else 'iflag=count_bytes']
    if oflag_direct:
        argv.append('oflag=direct')
    return argv


def throttled_copy(manager, src, dst, size, bs, rate=RATE, **kw):
    with manager.copy(src, dst, rate) as copy:
        elapsed = timed(dd_argv(copy.prefix, src, dst, size, bs, **kw))
        assert os.path.isdir(manager.driver.leaf_path(copy.id))
    assert not os.path.exists(manager.driver.leaf_path(copy.id))
    return size / elapsed / rate


# dd's own clock. In the VM lane (TCG emulation, tools/run-vm-tests.sh) dd's own CPU time
# is part of it: measured 0.905-0.994 there (dm-linear the slowest), 1.003-1.014 on hosts.
LOW = 0.85 if os.environ.get('CCT_VM') == '1' else 0.97


def assert_rate(ratio):
    print('achieved/limit %.3f' % ratio)  # shown with pytest -s
    assert LOW <= ratio <= 1.03, 'achieved/limit %.3f' % ratio


@pytest.mark.parametrize('bs', ['64K', '1M', '4M'])
def test_block_to_block_runs_at_limit(scratch, manager, bs):
    src, dst = scratch.loop(48), scratch.loop(48)
    size = 24 * MiB
    digest = fill_random(src, size)
    ratio = throttled_copy(manager, src, dst, size, bs)
    assert sha256_prefix(dst, size) == digest
    assert_rate(ratio)


def test_partition_to_partition(scratch, manager):
    _disk, (p1, p2) = scratch.partitioned_loop(96, (40, 40))
    size = 24 * MiB
    digest = fill_random(p1, size)
    assert_rate(throttled_copy(manager, p1, p2, size, '1M'))
    assert sha256_prefix(p2, size) == digest


def test_block_to_ext4_file_and_back(scratch, manager):
    src, back = scratch.loop(48), scratch.loop(48)
    mnt = scratch.mkfs_mount(scratch.loop(96), 'ext4')
    size = 24 * MiB
    digest = fill_random(src, size)
    image = os.path.join(mnt, 'image.raw')
    assert_rate(throttled_copy(manager, src, image, size, '1M'))
    assert sha256_prefix(image, size) == digest
    assert_rate(throttled_copy(manager, image, back, size, '1M'))
    assert sha256_prefix(back, size) == digest


def test_three_concurrent_copies_each_get_the_limit(scratch, manager):
    size = 16 * MiB
    pairs = [(scratch.loop(32), scratch.loop(32)) for _ in range(3)]
    digests = [fill_random(src, size) for src, _ in pairs]
    ratios = [None] * 3

    def one(i):
        ratios[i] = throttled_copy(manager, pairs[i][0], pairs[i][1], size, '1M')

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (src, dst), digest, ratio in zip(pairs, digests, ratios):
        assert sha256_prefix(dst, size) == digest
        assert_rate(ratio)
