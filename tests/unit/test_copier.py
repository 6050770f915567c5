"""The fallback's copier on real files and a real token pipe: it copies exactly what the
tokens allow, with dd's semantics (count, short source, sparse, a partial last sector).

Oracles: the bytes themselves (compared with the source), st_blocks for holes, and GNU dd
for what ``conv=sparse`` leaves behind.
"""
from __future__ import annotations

import os
import subprocess
import threading

import pytest

from cinder_cgroup_throttle.copier import UNIT, Copier

MiB = 1 << 20
UNPACED = 1 << 40  # bytes/s: a rate no test copy reaches


@pytest.fixture
def files(tmp_path):
    src = tmp_path / 'src'
    data = os.urandom(3 * MiB + 1000)
    src.write_bytes(data)
    return src, tmp_path / 'dst', data


def _copy(src, dst, expected, tokens=None, block=MiB, sparse=False, granted=0,
          rate=UNPACED):
    """Run a copier; ``tokens`` are written then the pipe closed (None: enough for all)."""
    read_end, write_end = os.pipe()
    source = os.open(src, os.O_RDONLY)
    copier = Copier(read_end, source, str(dst), expected, block, False, sparse, True, rate)
    copier.granted = granted
    copier.open()
    thread = threading.Thread(target=copier.run)
    thread.start()
    count = -(-(expected or os.path.getsize(src)) // UNIT) if tokens is None else tokens
    with os.fdopen(write_end, 'wb') as pipe:
        pipe.write(bytes(count))
    thread.join(30)
    os.close(source)
    assert not thread.is_alive()
    assert copier.error is None, copier.error
    return copier


def test_copies_everything_the_tokens_allow(files):
    src, dst, data = files
    copier = _copy(src, dst, len(data))
    assert copier.done == len(data) and dst.read_bytes() == data
    assert copier.report().startswith('%d bytes (3.1 MB, 3.0 MiB) copied, ' % len(data))


def test_copies_no_more_than_the_tokens_allow(files):
    src, dst, data = files
    copier = _copy(src, dst, len(data), tokens=1000)
    assert copier.done == 1000 * UNIT and dst.read_bytes() == data[:1000 * UNIT]


def test_head_start_is_copied_without_tokens(files):
    src, dst, data = files
    copier = _copy(src, dst, len(data), tokens=0, granted=2 * MiB)
    assert copier.done == 2 * MiB and dst.read_bytes() == data[:2 * MiB]


def test_count_and_short_source(files):
    src, dst, data = files
    assert _copy(src, dst, 12345).done == 12345 and dst.read_bytes() == data[:12345]
    # No size known (a FIFO as source would give none): to the source's end.
    assert _copy(src, dst, None).done == len(data) and dst.read_bytes() == data


def test_sparse_skips_zero_blocks_as_dd_does(tmp_path):
    src = tmp_path / 'src'
    block = 64 * 1024
    data = os.urandom(block) + bytes(4 * block) + os.urandom(block) + bytes(2 * block)
    src.write_bytes(data)
    dst = tmp_path / 'dst'
    copier = _copy(src, dst, len(data), block=block, sparse=True)
    assert copier.done == len(data) and dst.read_bytes() == data
    reference = tmp_path / 'dd'
    subprocess.run(['dd', 'if=%s' % src, 'of=%s' % reference, 'bs=%d' % block,
                    'conv=sparse', 'status=none'], check=True)
    assert os.stat(dst).st_blocks == os.stat(reference).st_blocks < len(data) // 512


def test_tokens_handed_over_at_once_are_taken_at_the_rate_beyond_the_catch_up(tmp_path):
    """pv's catch-up after a stall comes all at once (here: every token is in the pipe
    before the copy starts); the copier takes 1 s of the rate and a block at once,
    the rest at the rate. Judged on the copier's own clock, a lower bound: a busy machine
    can only make it longer."""
    src = tmp_path / 'src'
    data = os.urandom(12 * MiB)
    src.write_bytes(data)
    rate = 4 * MiB
    copier = _copy(src, tmp_path / 'dst', len(data), rate=rate)
    assert (tmp_path / 'dst').read_bytes() == data
    at_once = rate * 1.0 + MiB  # the documented bound, not the module's constant
    assert copier.seconds >= (len(data) - at_once) / rate  # 1.75 s


def test_destination_that_cannot_be_opened_names_it(tmp_path, files):
    src, _, _ = files
    copier = Copier(os.pipe()[0], os.open(src, os.O_RDONLY), str(tmp_path / 'no' / 'dst'),
                    10, MiB, False, False, False, UNPACED)
    with pytest.raises(OSError, match='cannot open .*/no/dst for writing: No such file'):
        copier.open()


def test_a_failed_step_is_named(tmp_path, files):
    """The error says what failed (reading, writing, fdatasync) and where."""
    _, dst, _ = files
    read_end, write_end = os.pipe()
    os.close(write_end)
    source = os.open(tmp_path, os.O_RDONLY)  # a directory: read(2) fails with EISDIR
    copier = Copier(read_end, source, str(dst), 4096, MiB, False, False, False, UNPACED,
                    source_name='/some/source')
    copier.granted = 4096
    copier.open()
    copier.run()
    os.close(source)
    assert copier.error is not None and copier.done == 0
    assert copier.error.strerror == ('reading /some/source at byte 0 failed: '
                                     'Is a directory')
