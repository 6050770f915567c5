"""Crash cleanup of registry state: only a dead owner's files go, never anything else.

cgroup leaves are covered on the real kernel in tests/kernel/test_cli.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from cinder_cgroup_throttle import cleanup
from cinder_cgroup_throttle.registry import Entry, Registry, process_start_time
from tests.scratch import pipe_state


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen(['true'])
    proc.wait()
    return proc.pid


def entry(copy_id, owner_pid, owner_start, **kw):
    fields = dict(id=copy_id, owner_pid=owner_pid, owner_start=owner_start, src='/dev/a',
                  dst='/dev/b', src_dev=None, dst_dev=None, bps_limit=1 << 20,
                  backend='pv', reason='test', started=time.time())
    fields.update(kw)
    return Entry(**fields)


def test_only_dead_owners_state_is_removed(tmp_path, dead_pid):
    registry = Registry(str(tmp_path))
    dead = entry('copy-%d-0000dead' % dead_pid, dead_pid, time.time() - 5)
    live = entry('copy-%d-0000a11e' % os.getpid(), os.getpid(),
                 process_start_time(os.getpid()))
    # pid reuse: the recorded owner started long before the process now holding the pid
    reused = entry('copy-%d-0000beef' % os.getpid(), os.getpid(), 1000.0)
    for e in (dead, live, reused):
        registry.save(e)
    pipe = tmp_path / (dead.id + '.pipe.json')  # its pipeline was killed, too
    pipe.write_text(json.dumps(pipe_state(dead.id, dead_pid, time.time() - 5)))
    stale_temp = tmp_path / ('.%s.json.0123456789abcdef.tmp' % dead.id)
    stale_temp.write_text('{')
    os.utime(stale_temp, (time.time() - 120,) * 2)
    # may still be written
    fresh_temp = tmp_path / ('.%s.pipe.json.0123456789abcdef.tmp' % dead.id)
    fresh_temp.write_text('{')
    foreign = tmp_path / 'notes.json'
    foreign.write_text('{}')

    dry = cleanup.clean(registry, None, dry_run=True)
    assert {(a.action, a.kind) for a in dry} == {('would remove', 'registry'),
                                                 ('would remove', 'pipefile'),
                                                 ('would remove', 'tempfile'),
                                                 ('kept', 'foreign')}
    assert len(os.listdir(tmp_path)) == 7

    actions = cleanup.clean(registry, None)
    assert sorted((a.kind, a.target) for a in actions) == sorted([
        ('registry', dead.id), ('registry', reused.id), ('pipefile', str(pipe)),
        ('tempfile', str(stale_temp)), ('foreign', str(foreign))])
    assert all(a.action == ('kept' if a.kind == 'foreign' else 'removed') for a in actions)
    assert [e.id for e in registry.entries()] == [live.id]
    assert fresh_temp.exists() and foreign.exists()
    assert [(a.kind, a.target) for a in cleanup.clean(registry, None)] == [
        ('foreign', str(foreign))]


def test_a_running_pipeline_keeps_its_entry(tmp_path, dead_pid):
    registry = Registry(str(tmp_path))
    orphan = entry('copy-%d-0000cafe' % dead_pid, dead_pid, time.time() - 5)
    registry.save(orphan)
    (tmp_path / (orphan.id + '.pipe.json')).write_text(json.dumps(
        pipe_state(orphan.id, os.getpid(), time.time())))
    actions = cleanup.clean(registry, None)
    assert [(a.action, a.kind, a.target) for a in actions] == [
        ('kept', 'registry', orphan.id)]
    assert 'pv pipeline runs on' in actions[0].reason
    assert registry.load(orphan.id) is not None


def test_an_entry_naming_a_foreign_cgroup_is_not_followed(tmp_path, dead_pid):
    """A forged or corrupt entry cannot make cleanup rmdir outside our cgroups."""
    registry = Registry(str(tmp_path / 'state'))
    victim = tmp_path / 'important' / ('copy-%d-0000f00d' % dead_pid)
    victim.mkdir(parents=True)
    for cgroup, mountpoint in (('blkio:important/%s' % victim.name, str(tmp_path)),
                               ('blkio:x/not-a-copy', '/sys/fs/cgroup/blkio')):
        forged = entry(victim.name, dead_pid, time.time(), backend='cgroup',
                       cgroup=cgroup, mountpoint=mountpoint)
        registry.save(forged)
        actions = cleanup.clean(registry, None)
        assert [(a.action, a.kind) for a in actions] == [('kept', 'registry')]
        assert victim.is_dir() and registry.load(victim.name) is not None


def test_budget_state_of_a_dead_process_is_removed(tmp_path, dead_pid):
    registry = Registry(str(tmp_path / 'state'))
    registry.files.makedirs()
    for pid in (os.getpid(), dead_pid):
        registry.files.write_json('budget-%d.json' % pid, {'pid': pid})
    assert registry.scan() == ([], [])  # a name of ours, not an entry and not foreign
    actions = cleanup.clean(registry, None)
    assert [(a.kind, os.path.basename(a.target), a.action) for a in actions] == [
        ('budget', 'budget-%d.json' % dead_pid, 'removed')]
    assert registry.files.names() == ['budget-%d.json' % os.getpid()]


def test_finished_records_are_state_files_and_their_stale_temp_files_go(tmp_path):
    """A volume's finished-copy record (progress.py) is a flat state file: known to the
    scan, kept by cleanup; a temporary file of one (no pid in its name) goes by age."""
    registry = Registry(str(tmp_path / 'state'))
    registry.files.makedirs()
    registry.files.write_json('finished-vol-1.data.json', {'volume_id': 'vol-1'})
    fresh = tmp_path / 'state' / ('.finished-vol-1.wipe.json.%s.tmp' % ('0' * 16))
    stale = tmp_path / 'state' / ('.finished-vol-2.data.json.%s.tmp' % ('1' * 16))
    for temp in (fresh, stale):
        temp.write_text('{')
    os.utime(stale, (time.time() - 120,) * 2)
    assert registry.scan() == ([], [])
    actions = cleanup.clean(registry, None)
    assert [(a.kind, os.path.basename(a.target), a.action) for a in actions] == [
        ('tempfile', stale.name, 'removed')]
    assert registry.files.names() == [fresh.name, 'finished-vol-1.data.json']
