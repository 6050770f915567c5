"""Progress arithmetic and dd argv parsing (what status and the progress bar show)."""
from __future__ import annotations

import json
import time

import pytest

from cinder_cgroup_throttle.progress import Progress, ProgressMonitor, dd_total, path_size
from cinder_cgroup_throttle.registry import Entry, Registry
from tests.scratch import pipe_state

MiB = 1 << 20


@pytest.mark.parametrize('argv, total', [
    # What Cinder's copy_volume builds: count in bytes.
    (['dd', 'if=/dev/a', 'of=/dev/b', 'count=1073741824', 'bs=1M',
      'iflag=count_bytes,direct', 'oflag=direct'], 1 << 30),
    # Blocks of bs, with dd's suffixes and products.
    (['dd', 'if=a', 'of=b', 'count=16', 'bs=4M'], 64 * MiB),
    (['dd', 'if=a', 'of=b', 'count=2x3', 'bs=1kB'], 6000),
    (['dd', 'if=a', 'of=b', 'count=10'], 5120),  # dd's default 512-byte blocks
    (['dd', 'if=a', 'of=b', 'count=4', 'ibs=64K', 'bs=1M'], 256 * 1024),
    (['dd', 'if=a', 'of=b', 'bs=1M'], None),  # no count: until EOF
    (['dd', 'if=a', 'of=b', 'count=1', 'bs=1Q'], None),  # not a dd size
])
def test_dd_total(argv, total):
    assert dd_total(argv) == total


def test_percent_eta_and_their_edges():
    p = Progress(bytes_done=16 * MiB, total_bytes=64 * MiB, rate_bps=8 * MiB,
                 average_bps=4 * MiB, source='cgroup')
    assert p.percent == 25.0
    assert p.eta_s == pytest.approx(6.0)
    # A stalled copy (dead owner): a measured rate of 0 gives no ETA, not the average's.
    assert Progress(MiB, 2 * MiB, 0.0, MiB, 'cgroup').eta_s is None
    # No rate measured yet: no ETA (the average is skewed by the start).
    assert Progress(MiB, 3 * MiB, None, MiB, 'cgroup').eta_s is None
    # Readahead can count past the total: capped, done.
    over = Progress(65 * MiB, 64 * MiB, MiB, MiB, 'cgroup')
    assert (over.percent, over.eta_s) == (100.0, 0.0)
    unknown = Progress(None, None, None, None, 'none')
    assert (unknown.percent, unknown.eta_s) == (None, None)
    assert Progress(MiB, None, MiB, MiB, 'psutil').as_dict()['percent'] is None


def test_path_size(tmp_path):
    f = tmp_path / 'image'
    f.write_bytes(b'x' * 12345)
    assert path_size(str(f)) == 12345
    assert path_size('/dev/zero') is None
    assert path_size(str(tmp_path / 'missing')) is None


def test_monitor_without_a_source_reports_unknown_progress(tmp_path):
    """An unthrottled copy has no counters: progress is unknown, never invented."""
    entry = Entry(id='copy-1-0123abcd', owner_pid=1, owner_start=None, src='/dev/zero',
                  dst=str(tmp_path / 'out'), src_dev=None, dst_dev=None, bps_limit=MiB,
                  backend='none', reason='test', started=time.time() - 1)
    p = ProgressMonitor(Registry(str(tmp_path))).sample(entry)
    assert (p.bytes_done, p.source, p.total_bytes) == (None, 'none', None)


def test_rate_over_a_window_of_samples(tmp_path):
    """The pv fallback's published byte count drives the same arithmetic as cgroups."""
    entry = Entry(id='copy-1-0123abcd', owner_pid=1, owner_start=None, src='/dev/zero',
                  dst='/dev/null', src_dev=None, dst_dev=None, bps_limit=MiB,
                  backend='pv', reason='test', started=time.time(), total_bytes=8 * MiB)
    state = tmp_path / (entry.id + '.pipe.json')

    def publish(done):
        state.write_text(json.dumps(pipe_state(entry.id, 1, entry.started, done)))

    monitor = ProgressMonitor(Registry(str(tmp_path)), window=0.3)
    publish(0)
    assert monitor.sample(entry).rate_bps is None  # one sample: no rate yet
    t0 = time.monotonic()
    for done in (MiB, 2 * MiB, 3 * MiB):
        time.sleep(0.1)
        publish(done)
        p = monitor.sample(entry)
    elapsed = time.monotonic() - t0
    # >= 0.3 s of samples: the rate spans all three steps, not just the last one.
    assert p.rate_bps == pytest.approx(3 * MiB / elapsed, rel=0.1)
    assert (p.bytes_done, p.source, p.percent) == (3 * MiB, 'pv', 37.5)
    state.unlink()  # the pipeline ended: nothing is invented
    assert monitor.sample(entry).bytes_done is None
