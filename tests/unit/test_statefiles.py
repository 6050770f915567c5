"""The state directory's safe reader/writer and the entry parser (statefiles, registry)."""
from __future__ import annotations

import dataclasses
import json
import os
import stat
import threading
import time

import pytest

from cinder_cgroup_throttle import privileged
from cinder_cgroup_throttle.exception import InvalidRate, ThrottleError
from cinder_cgroup_throttle.registry import FIELD_CHECKS, Entry, Registry
from cinder_cgroup_throttle.statefiles import (MAX_BYTES, TEMP_NAME, ForeignFile, StateDir,
                                               StateDirError)
from cinder_cgroup_throttle.units import parse_rate

ID = 'copy-%d-0123abcd' % os.getpid()


def valid(**kw):
    data = dict(id=ID, owner_pid=os.getpid(), owner_start=None, src='/dev/a', dst='/dev/b',
                src_dev='7:1', dst_dev=None, bps_limit=1 << 20, backend='cgroup',
                reason='test', started=time.time(), volume_id='v', cgroup=None,
                mountpoint=None, total_bytes=None,
                extra={'requested_bps': 1, 'host_bps_limit': 0,
                       'static': {'read_bps': 0, 'write_bps': 0, 'read_iops': 0,
                                  'write_iops': 0}},
                src_via_file=False, dst_via_file=True)
    data.update(kw)
    return data


@pytest.fixture
def state(tmp_path):
    path = tmp_path / 'state'
    path.mkdir(mode=0o755)
    return path


def test_every_entry_field_has_a_type_check():
    assert set(FIELD_CHECKS) == {f.name for f in dataclasses.fields(Entry)}


def test_a_valid_entry_round_trips(state):
    registry = Registry(str(state))
    registry.save(Entry(**valid()))
    assert dataclasses.asdict(registry.read(ID)) == valid(started=registry.read(ID).started)
    assert stat.S_IMODE(os.stat(state / (ID + '.json')).st_mode) == 0o644


@pytest.mark.parametrize('field, value', [
    ('id', '../../etc/foo'), ('id', 'copy-1-0123abcd'), ('id', ID + '\n'), ('id', 7),
    ('owner_pid', '123'), ('owner_pid', [1]), ('owner_pid', True), ('owner_pid', 0),
    ('owner_pid', 2**80), ('owner_start', 'x'), ('src', None), ('src', 'a\0b'),
    ('src_dev', '1:2\n'), ('src_dev', '99999:1'), ('src_dev', [7, 1]),
    ('bps_limit', 2**64), ('bps_limit', -1), ('bps_limit', 1.5), ('backend', 'sh'),
    ('started', float('inf')), ('total_bytes', '1'), ('extra', []),
    ('extra', {'static': {'read_bps': 'x'}}), ('extra', {'static': {'evil': 1}}),
    ('extra', {'requested_bps': -1}), ('src_via_file', 1), ('volume_id', {}),
])
def test_a_mistyped_field_makes_a_foreign_file(state, field, value):
    (state / (ID + '.json')).write_text(json.dumps(valid(**{field: value})))
    with pytest.raises(ForeignFile, match=repr(field) if field != 'id' else 'id'):
        Registry(str(state)).read(ID)


@pytest.mark.parametrize('change', [
    lambda d: d.pop('owner_pid'), lambda d: d.update(shell='rm -rf /'),
], ids=['missing field', 'unknown field'])
def test_missing_or_unknown_fields_make_a_foreign_file(state, change):
    data = valid()
    change(data)
    (state / (ID + '.json')).write_text(json.dumps(data))
    with pytest.raises(ForeignFile):
        Registry(str(state)).read(ID)


def hard_link(other, path):
    other.write_text('{}')
    os.link(other, path)


@pytest.mark.parametrize('make, reason', [
    (lambda p: os.symlink('/etc/passwd', p), 'symbolic link'),
    (lambda p: os.symlink('/dev/zero', p), 'symbolic link'),
    (lambda p: os.mkfifo(p), 'not a regular file'),
    (lambda p: os.mkdir(p), 'not a regular file'),
    (lambda p: p.write_text(' ' * (MAX_BYTES + 1)), 'larger than'),
    (lambda p: p.write_text('[' * 60000), 'not JSON'),
    (lambda p: p.write_bytes(b'\xff\xfe'), 'not JSON'),
    (lambda p: p.write_text('[1]'), 'not a JSON object'),
    (lambda p: hard_link(p.parent / 'x', p), 'hard links'),
], ids=['link', 'link to /dev/zero', 'fifo', 'directory', 'too large', 'deep nesting',
        'not utf-8', 'list', 'hard link'])
def test_reads_never_block_follow_or_overread(state, make, reason):
    make(state / (ID + '.json'))
    t0 = time.monotonic()
    with pytest.raises(ForeignFile, match=reason):
        StateDir(str(state)).read_json(ID + '.json')
    assert time.monotonic() - t0 < 1


def test_only_our_names_are_used(state):
    files = StateDir(str(state))
    for name in ('../x.json', 'x.json', ID + '.json\n', '.relimit.lock/..', ''):
        with pytest.raises(ForeignFile):
            files.write_json(name, {})
        with pytest.raises(ForeignFile):
            files.read_json(name)
        with pytest.raises(ForeignFile):
            files.remove(name)
    assert os.listdir(state) == []


def test_a_version_replaced_while_read_is_not_foreign(state):
    """A writer renames a newer version over the file between the reader's open and its
    fstat (the wrapper rewrites its state every few ms): the reader holds the previous,
    complete version, now without a name (0 links), and reads it."""
    sd = StateDir(str(state))
    sd.write_json(ID + '.json', {'v': 1})
    real_fstat, replaced = os.fstat, []

    def replace_then_fstat(fd):  # the writer's move, at the worst moment
        if not replaced and stat.S_ISREG(real_fstat(fd).st_mode):
            replaced.append(True)
            sd.write_json(ID + '.json', {'v': 2})
        return real_fstat(fd)

    os.fstat = replace_then_fstat
    try:
        assert sd.read_json(ID + '.json') == {'v': 1}
    finally:
        os.fstat = real_fstat
    assert replaced and sd.read_json(ID + '.json') == {'v': 2}


def test_writes_replace_links_never_follow_them(state, tmp_path):
    secret = tmp_path / 'secret'
    secret.write_text('s')
    secret.chmod(0o600)
    os.symlink(secret, state / (ID + '.json'))
    seen = []
    real_rename = os.rename

    def swap_then_rename(src, dst, **kw):  # the attacker's move, at the worst moment
        seen.append(src)
        assert TEMP_NAME.match(src)
        os.unlink(src, dir_fd=kw['src_dir_fd'])
        os.symlink(secret, src, dir_fd=kw['src_dir_fd'])
        return real_rename(src, dst, **kw)

    os.rename = swap_then_rename
    try:
        StateDir(str(state)).write_json(ID + '.json', {'a': 1})
    finally:
        os.rename = real_rename
    assert seen and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert secret.read_text() == 's'


def test_the_directory_must_be_trustworthy(tmp_path, state):
    os.symlink(state, tmp_path / 'link')
    with pytest.raises(StateDirError, match='symbolic link'):
        StateDir(str(tmp_path / 'link')).names()
    state.chmod(0o775)
    with pytest.raises(StateDirError, match='writable by group or others'):
        StateDir(str(state)).names()
    state.chmod(0o755)
    if os.geteuid() == 0:  # root: no ancestor another user may replace
        os.chown(tmp_path, 65534, 65534)
        try:
            with pytest.raises(StateDirError, match='may be replaced by another user'):
                StateDir(str(state)).names()
        finally:
            os.chown(tmp_path, 0, 0)


def test_foreign_files_are_reported_not_removed(state):
    (state / 'notes').write_text('x')
    os.mkfifo(state / (ID + '.json'))
    registry = Registry(str(state))
    entries, foreign = registry.scan()
    assert entries == [] and sorted(f.name for f in foreign) == [ID + '.json', 'notes']
    assert sorted(os.listdir(state)) == [ID + '.json', 'notes']


def test_lock_file_must_be_regular(state):
    os.mkfifo(state / '.relimit.lock')
    done = []
    t = threading.Thread(target=lambda: done.append(
        pytest.raises(ForeignFile, StateDir(str(state)).open_lock)))
    t.start()
    t.join(2)
    assert done, 'opening a FIFO lock file blocked'


@pytest.mark.parametrize('text', ['18446744073709551616', str(2**64 + 1000), '16777216Ti',
                                  '9' * 100, '17179869184.5Gi'])
def test_rates_beyond_u64_are_refused(text):
    with pytest.raises(InvalidRate, match='too large'):
        parse_rate(text)


def test_largest_rate_is_accepted():
    assert parse_rate(str(2**64 - 1)) == parse_rate(2**64 - 1) == 2**64 - 1
    with pytest.raises(InvalidRate, match='too large'):
        parse_rate(2**64)


@pytest.mark.parametrize('argv, named', [
    (['99999999999999999999:1'], 'device must be MAJ:MIN'),
    (['4096:0'], 'device must be MAJ:MIN'),
    (['7:1\n'], 'device must be MAJ:MIN'),
])
def test_privileged_device_numbers_are_bounded(argv, named):
    with pytest.raises(ThrottleError, match=named):
        privileged._device(argv[0])


@pytest.mark.parametrize('value', [str(2**64), '1\n', '\u00b2', '-1', ''])
def test_privileged_counts_are_bounded(value):
    with pytest.raises(ThrottleError, match='rbps must be an integer'):
        privileged._count(value, 'rbps')
