"""Effective limits: config lookup order, metadata rules, fair shares, device limits."""
from __future__ import annotations

import logging

import pytest
from oslo_config import cfg

from cinder_cgroup_throttle import policy
from cinder_cgroup_throttle.devices import BlockDevice
from cinder_cgroup_throttle.exception import InvalidRate
from cinder_cgroup_throttle.sharing import StaticLimits, device_limits, fair_shares

MiB = 2**20
KEY = 'volume_copy_bps_limit'


def load(tmp_path, text, group='lvm-1'):
    path = tmp_path / 'cinder.conf'
    path.write_text(text)
    conf = cfg.ConfigOpts()
    conf([], default_config_files=[str(path)])
    return policy.load_config(conf, group)


@pytest.mark.parametrize('text, expected', [
    ('[DEFAULT]\nvolume_copy_bps_limit = 1000\n', 1000),
    ('[DEFAULT]\nvolume_copy_bps_limit = 1000\n'
     '[backend_defaults]\nvolume_copy_bps_limit = 2000\n', 2000),
    ('[DEFAULT]\nvolume_copy_bps_limit = 1000\n'
     '[backend_defaults]\nvolume_copy_bps_limit = 2000\n'
     '[lvm-1]\nvolume_copy_bps_limit = 3000\n', 3000),
    ('[DEFAULT]\nvolume_copy_bps_limit = 1000\n'
     '[backend_defaults]\nvolume_copy_bps_limit = 2000\n'
     '[lvm-1]\nvolume_copy_bps_limit = 0\n', 0),
    ('[backend_defaults]\nvolume_copy_bps_limit = 2000\n'
     '[lvm-2]\nvolume_copy_bps_limit = 0\n', 2000),
    ('', 0),
], ids=['default', 'backend_defaults-beats-default', 'backend-section-wins',
        'explicit-zero-disables', 'other-backend-irrelevant', 'unset'])
def test_lookup_order(tmp_path, text, expected):
    assert load(tmp_path, text).bps_limit == expected


def test_every_option_follows_the_lookup(tmp_path):
    config = load(tmp_path, """
[DEFAULT]
volume_copy_host_bps_limit = 1Gi
volume_copy_throttle_backend = pv
[backend_defaults]
volume_copy_read_bps_limit = 10M
volume_copy_write_iops_limit = 300
volume_copy_bps_limit_metadata_key = copy_rate
[lvm-1]
volume_copy_write_iops_limit = 0
volume_copy_blkio_cgroup_name = cinder/lvm-1
volume_copy_allow_unthrottled = true
""")
    assert config == policy.ThrottleConfig(
        bps_limit=0, static=StaticLimits(read_bps=10**7), host_bps_limit=2**30,
        cgroup_name='cinder/lvm-1', backend='pv', allow_unthrottled=True,
        metadata_key='copy_rate')


def test_without_backend_section_only_default_counts(tmp_path):
    text = ('[DEFAULT]\nvolume_copy_bps_limit = 1000\n'
            '[backend_defaults]\nvolume_copy_bps_limit = 2000\n')
    assert load(tmp_path, text, group=None).bps_limit == 1000


def test_cinders_none_default_in_backend_section_counts_as_unset(tmp_path):
    """Cinder's BackendGroupConfiguration sets the backend group's defaults to None."""
    path = tmp_path / 'cinder.conf'
    path.write_text('[backend_defaults]\nvolume_copy_bps_limit = 2000\n')
    conf = cfg.ConfigOpts()
    conf([], default_config_files=[str(path)])
    policy.load_config(conf, 'lvm-1')
    conf.set_default('volume_copy_bps_limit', None, group='lvm-1')
    assert policy.load_config(conf, 'lvm-1').bps_limit == 2000


def vol(user=None, admin=None, vid='v1'):
    return {'id': vid, 'metadata': {KEY: user} if user is not None else {},
            'admin_metadata': {KEY: admin} if admin is not None else {}}


@pytest.mark.parametrize('volume, operator, expected, warns', [
    (vol(user='4Mi'), 8 * MiB, 4 * MiB, False),
    (vol(user='4M'), 8 * MiB, 4 * 10**6, False),
    (vol(user='32Mi'), 8 * MiB, 8 * MiB, True),
    (vol(user='0'), 8 * MiB, 8 * MiB, True),
    (vol(user='8Mi'), 8 * MiB, 8 * MiB, False),
    (vol(user='4Mi'), 0, 4 * MiB, False),
    (vol(user='many'), 8 * MiB, 8 * MiB, True),
    (vol(user='-1'), 8 * MiB, 8 * MiB, True),
    (vol(admin='32Mi'), 8 * MiB, 32 * MiB, False),
    (vol(admin='2Mi'), 8 * MiB, 2 * MiB, False),
    (vol(admin='0'), 8 * MiB, 0, False),
    (vol(admin='32Mi', user='16Mi'), 8 * MiB, 16 * MiB, False),
    (vol(admin='32Mi', user='64Mi'), 8 * MiB, 32 * MiB, True),
    (vol(admin='lots'), 8 * MiB, 8 * MiB, True),
    (vol(), 8 * MiB, 8 * MiB, False),
    (vol(admin=str(2**64 + 1000)), 8 * MiB, 8 * MiB, True),
    (vol(user='1' * 5000), 8 * MiB, 8 * MiB, True),
    (vol(user=['4Mi']), 8 * MiB, 8 * MiB, True),
], ids=['user-lowers', 'user-decimal-units', 'user-cannot-raise', 'user-zero-is-raise',
        'user-equal', 'user-limits-unlimited', 'user-invalid', 'user-negative',
        'admin-raises', 'admin-lowers', 'admin-unlimited', 'user-lowers-admin',
        'user-cannot-raise-above-admin', 'admin-invalid', 'no-metadata',
        'admin-beyond-u64', 'user-huge', 'user-not-a-string'])
def test_volume_metadata_rules(caplog, volume, operator, expected, warns):
    with caplog.at_level(logging.INFO, logger='cinder_cgroup_throttle.policy'):
        assert policy.volume_bps_limit(volume, operator, KEY) == expected
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert bool(warned) == warns, caplog.text
    if warns:
        assert 'v1' in warned[0].getMessage()


def test_empty_key_disables_metadata():
    assert policy.volume_bps_limit(vol(user='1Mi'), 8 * MiB, '') == 8 * MiB


def test_copy_of_several_volumes_gets_the_lowest():
    volumes = [vol(user='6Mi', vid='a'), vol(vid='b'), vol(user='2Mi', vid='c')]
    assert policy.copy_bps_limit(volumes, 8 * MiB, KEY) == 2 * MiB
    assert policy.copy_bps_limit([vol(admin='0'), vol(admin='0')], 8 * MiB, KEY) == 0
    assert policy.copy_bps_limit([vol(admin='0'), vol()], 8 * MiB, KEY) == 8 * MiB
    assert policy.copy_bps_limit([], 8 * MiB, KEY) == 8 * MiB


class Unreadable:
    id = 'broken'

    @property
    def metadata(self):
        raise RuntimeError('no database here')

    admin_metadata = metadata


def test_unreadable_metadata_is_no_metadata():
    assert policy.volume_bps_limit(Unreadable(), 8 * MiB, KEY) == 8 * MiB


@pytest.mark.cinder
def test_cinder_volume_object():
    from cinder import objects
    objects.register_all()
    volume = objects.Volume(id='5c1e0000-0000-4000-8000-000000000000',
                            metadata={KEY: '3Mi'}, admin_metadata={KEY: '1Gi'})
    assert policy.volume_bps_limit(volume, 8 * MiB, KEY) == 3 * MiB


@pytest.mark.parametrize('requested, cap, expected', [
    ({'a': 5, 'b': 0}, 0, {'a': 5, 'b': 0}),
    ({'a': 0, 'b': 0, 'c': 0}, 12, {'a': 4, 'b': 4, 'c': 4}),
    ({'a': 0, 'b': 0}, 12, {'a': 6, 'b': 6}),
    ({'a': 2, 'b': 0}, 12, {'a': 2, 'b': 10}),
    ({'a': 2, 'b': 20, 'c': 20}, 12, {'a': 2, 'b': 5, 'c': 5}),
    ({'a': 100, 'b': 100}, 12, {'a': 6, 'b': 6}),
    ({'a': 3, 'b': 3}, 12, {'a': 3, 'b': 3}),
    ({'a': 0, 'b': 0, 'c': 0}, 10, {'a': 3, 'b': 3, 'c': 4}),
], ids=['no-cap', 'three-equal', 'two-equal', 'low-own-limit-leaves-rest',
        'mixed', 'all-above-share', 'all-below-share', 'remainder'])
def test_fair_shares(requested, cap, expected):
    shares = fair_shares(requested, cap)
    assert shares == expected
    if cap:
        assert sum(shares.values()) <= cap


DISK_A, DISK_B = BlockDevice(7, 1, 'loop1'), BlockDevice(7, 2, 'loop2')


def limits(lims):
    return sorted((lim.device.majmin, lim.rbps, lim.wbps, lim.riops, lim.wiops)
                  for lim in lims)


def test_device_limits_rate_only_follows_the_one_direction_rule():
    assert limits(device_limits(DISK_A, DISK_B, 100)) == [('7:2', 0, 100, 0, 0)]
    assert limits(device_limits(DISK_A, None, 100)) == [('7:1', 100, 0, 0, 0)]
    assert device_limits(None, None, 100) == []


def test_device_limits_with_static_limits():
    static = StaticLimits(read_bps=50, write_bps=80, read_iops=10, write_iops=20)
    assert limits(device_limits(DISK_A, DISK_B, 100, static)) == [
        ('7:1', 50, 0, 10, 0), ('7:2', 0, 80, 0, 20)]
    # Same disk both ways (a copy within one disk): one entry, the lower write limit.
    assert limits(device_limits(DISK_A, DISK_A, 100, static)) == [('7:1', 50, 80, 10, 20)]
    assert limits(device_limits(DISK_A, DISK_B, 0, StaticLimits(write_iops=5))) == [
        ('7:2', 0, 0, 0, 5)]


# -- limit sources per copy kind, and the operator's floor under tenant metadata -----------
@pytest.mark.parametrize('kind, volume, expected', [
    (policy.WIPE, vol(user='1'), 8 * MiB),
    (policy.WIPE, vol(user='1Mi'), 8 * MiB),
    (policy.WIPE, vol(admin='2Mi'), 2 * MiB),
    (policy.MIGRATION, vol(user='1'), 8 * MiB),
    (policy.MIGRATION, vol(admin='32Mi', user='1Mi'), 32 * MiB),
    (policy.RETYPE, vol(user='1'), MiB),
    (policy.RETYPE, vol(user='2Mi'), 2 * MiB),
    (policy.CLONE, vol(user='1'), MiB),
    (policy.IMAGE, vol(user='100K'), MiB),
    (policy.OTHER, vol(user='1'), MiB),
    (policy.CLONE, vol(admin='512Ki'), 512 * 1024),  # admin metadata may go below
], ids=['wipe-ignores-user', 'wipe-ignores-user-above-floor', 'wipe-admin',
        'admin-migration-ignores-user', 'admin-migration-admin', 'retype-floor',
        'retype-user', 'clone-floor', 'image-floor', 'other-floor', 'admin-below-floor'])
def test_sources_by_copy_kind(kind, volume, expected):
    assert policy.copy_bps_limit([volume], 8 * MiB, KEY, kind=kind, min_bps=MiB) == expected


def test_every_kind_has_sources():
    kinds = {policy.WIPE, policy.MIGRATION, policy.RETYPE, policy.CLONE, policy.IMAGE,
             policy.OTHER}
    assert set(policy.LIMIT_SOURCES) == kinds
    assert all(set(s) <= {'admin', 'user'} for s in policy.LIMIT_SOURCES.values())


def test_floor_option(tmp_path):
    assert load(tmp_path, '').min_bps == MiB
    assert load(tmp_path, '[lvm-1]\nvolume_copy_min_bps_limit = 4Mi\n').min_bps == 4 * MiB
    with pytest.raises(ValueError):
        load(tmp_path, '[lvm-1]\nvolume_copy_min_bps_limit = %d\n' % 2**64).min_bps


def test_pipe_rate_is_the_lowest_bytes_limit():
    from cinder_cgroup_throttle.sharing import pipe_rate
    static = StaticLimits(read_bps=50, write_bps=80, read_iops=10)
    assert pipe_rate(100, device_limits(DISK_A, DISK_B, 100, static)) == 50
    assert pipe_rate(0, device_limits(DISK_A, DISK_B, 0, StaticLimits(write_bps=80))) == 80
    assert pipe_rate(0, device_limits(DISK_A, DISK_B, 0, StaticLimits(write_iops=5))) == 0
    assert pipe_rate(100, []) == 100 and pipe_rate(0, []) == 0


@pytest.mark.parametrize('value', [str(2**64 + 1000), '-1'])
def test_cinders_integer_option_is_bounded(tmp_path, value):
    with pytest.raises(InvalidRate, match='volume_copy_bps_limit'):
        load(tmp_path, '[lvm-1]\nvolume_copy_bps_limit = %s\n' % value)


@pytest.mark.parametrize('qos, user, admin, expected', [
    ('32Mi', None, None, 32 * MiB),
    ('2Mi', None, None, 2 * MiB),
    ('32Mi', '16Mi', None, 16 * MiB),
    ('32Mi', '64Mi', None, 32 * MiB),
    ('32Mi', None, '4Mi', 4 * MiB),
    ('fast', None, None, 8 * MiB),
], ids=['qos-raises', 'qos-lowers', 'user-lowers-qos', 'user-cannot-raise-above-qos',
        'admin-metadata-beats-qos', 'qos-invalid-ignored'])
def test_backend_qos_spec_replaces_the_operators_limit(qos, user, admin, expected):
    volume = dict(vol(user=user, admin=admin), qos_specs={KEY: qos, 'total_iops_sec': '9'})
    assert policy.volume_bps_limit(volume, 8 * MiB, KEY) == expected


@pytest.mark.parametrize('kind', sorted(policy.LIMIT_SOURCES))
def test_backend_qos_spec_applies_to_every_copy_kind(kind):
    """An admin's setting, like the option: it replaces the operator's rate for every
    kind; tenant metadata still only lowers it, never below the floor, and only for the
    kinds whose sources include it."""
    qos = {KEY: '32Mi'}
    assert policy.copy_bps_limit([dict(vol(), qos_specs=qos)], 8 * MiB, KEY, kind=kind,
                                 min_bps=MiB) == 32 * MiB
    tenant = dict(vol(user='1'), qos_specs=qos)
    expected = MiB if 'user' in policy.LIMIT_SOURCES[kind] else 32 * MiB
    assert policy.copy_bps_limit([tenant], 8 * MiB, KEY, kind=kind, min_bps=MiB) == expected
    admin = dict(vol(admin='4Mi'), qos_specs=qos)
    assert policy.copy_bps_limit([admin], 8 * MiB, KEY, kind=kind, min_bps=MiB) == 4 * MiB
