"""Progress arithmetic and dd argv parsing (what status and the progress bar show)."""
from __future__ import annotations

import json
import os
import time

import pytest

from cinder_cgroup_throttle.progress import (FINISHED_KEEP_S, Progress, ProgressMonitor, dd_total,
                                             forget_finished, metrics_text, path_size,
                                             record_finished, volume_progress)
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


def _entry(tmp_path, volume_id='vol-1', src='/dev/zero', total=8 * MiB, copy_id=None):
    return Entry(id=copy_id or 'copy-1-0123abcd', owner_pid=1, owner_start=None, src=src,
                 dst='/dev/null', src_dev=None, dst_dev=None, bps_limit=MiB, backend='pv',
                 reason='test', started=time.time() - 2, volume_id=volume_id,
                 total_bytes=total)


def test_volume_progress_follows_the_migration_api_semantics(tmp_path):
    registry = Registry(str(tmp_path))
    assert volume_progress(registry, 'vol-1').text == 'NA'
    assert volume_progress(registry, 'vol-1', 'starting').text == '0%'
    assert volume_progress(registry, 'vol-1', 'migrating').text == '0%'
    assert volume_progress(registry, 'vol-1', 'success').text == '100%'
    entry = _entry(tmp_path, src='/dev/loop1')
    registry.save(entry)
    started = volume_progress(registry, 'vol-1')
    assert (started.text, started.state) == ('0%', 'starting')  # no byte count yet
    state = tmp_path / (entry.id + '.pipe.json')
    state.write_text(json.dumps(pipe_state(entry.id, 1, entry.started, 3 * MiB)))
    copying = volume_progress(registry, 'vol-1', 'migrating')
    assert (copying.text, copying.state) == ('37%', 'copying')
    state.write_text(json.dumps(pipe_state(entry.id, 1, entry.started, 8 * MiB)))
    assert volume_progress(registry, 'vol-1').text == '99%'  # 100% only once it ended
    record_finished(registry, entry, ok=True)
    registry.remove(entry.id)
    done = volume_progress(registry, 'vol-1', 'migrating')
    assert (done.text, done.state) == ('100%', 'done')
    assert done.finished['bytes_done'] == 8 * MiB and done.finished['copy_id'] == entry.id
    assert volume_progress(registry, 'vol-2').text == 'NA'  # other volumes: unknown
    forget_finished(registry, 'vol-1')
    assert volume_progress(registry, 'vol-1').text == 'NA'


def test_a_wipe_is_not_the_volumes_progress(tmp_path):
    registry = Registry(str(tmp_path))
    data = _entry(tmp_path, src='/dev/loop1')
    record_finished(registry, data, ok=True)
    wipe = _entry(tmp_path, copy_id='copy-1-89abcdef')  # from /dev/zero
    registry.save(wipe)
    (tmp_path / (wipe.id + '.pipe.json')).write_text(
        json.dumps(pipe_state(wipe.id, 1, wipe.started, MiB)))
    vp = volume_progress(registry, 'vol-1')
    assert vp.text == '100%'
    assert [c['kind'] for c in vp.as_dict()['copies']] == ['wipe']


def test_failed_copy_reads_na_and_records_are_validated(tmp_path):
    registry = Registry(str(tmp_path))
    entry = _entry(tmp_path, src='/dev/loop1')
    (tmp_path / (entry.id + '.pipe.json')).write_text(
        json.dumps(pipe_state(entry.id, 1, entry.started, MiB)))
    record_finished(registry, entry, ok=False)
    failed = volume_progress(registry, 'vol-1')
    assert (failed.text, failed.state, failed.finished['bytes_done']) == ('NA', 'failed', MiB)
    record = tmp_path / 'finished-vol-1.data.json'
    target = tmp_path / 'elsewhere.json'
    target.write_text(record.read_text().replace('false', 'true'))
    record.unlink()
    record.symlink_to(target)  # a planted link is never followed
    assert volume_progress(registry, 'vol-1').text == 'NA'
    record.unlink()
    record.write_text('{"volume_id": "vol-1", "ok": "yes", "ended": 1}')
    assert volume_progress(registry, 'vol-1').finished is None
    assert volume_progress(registry, '../vol-1').text == 'NA'  # not a volume id


def test_metrics_text_is_prometheus_exposition_format(tmp_path):
    entry = _entry(tmp_path, volume_id='v"1', src='/dev/loop1')
    text = metrics_text([entry], [Progress(2 * MiB, 8 * MiB, 1048576.5, None, 'pv')])
    lines = text.splitlines()
    labels = '{copy="copy-1-0123abcd",volume="v\\"1",kind="data",backend="pv"}'
    assert 'cinder_volume_copy_bytes_done%s %d' % (labels, 2 * MiB) in lines
    assert 'cinder_volume_copy_bytes_total%s %d' % (labels, 8 * MiB) in lines
    assert 'cinder_volume_copy_rate_bytes_per_second%s 1.04858e+06' % labels in lines
    assert 'cinder_volume_copy_limit_bytes_per_second%s %d' % (labels, MiB) in lines
    assert 'cinder_volume_copy_progress_ratio%s 0.25' % labels in lines
    assert lines[-1] == 'cinder_volume_copy_active 1'
    for name in ('bytes_done', 'bytes_total', 'rate_bytes_per_second', 'progress_ratio'):
        assert '# TYPE cinder_volume_copy_%s gauge' % name in lines
    empty = metrics_text([], [])
    assert empty.endswith('cinder_volume_copy_active 0\n')


def test_finished_records_are_flat_state_files_and_old_ones_are_pruned(tmp_path):
    registry = Registry(str(tmp_path))
    old = tmp_path / 'finished-vol-old.data.json'
    old.write_text('{"volume_id": "vol-old", "ok": true, "ended": 1}')
    os.utime(old, (time.time() - FINISHED_KEEP_S - 60,) * 2)
    entry = _entry(tmp_path, src='/dev/loop1')
    record_finished(registry, entry, ok=True)
    assert sorted(os.listdir(tmp_path)) == ['finished-vol-1.data.json']
    assert registry.scan() == ([], [])  # a name of ours, not foreign
    record_finished(registry, _entry(tmp_path, volume_id='../x'), ok=True)  # not an id
    assert sorted(os.listdir(tmp_path)) == ['finished-vol-1.data.json']
