"""The hook's plumbing: volume context, wrapped driver methods, driver construction."""
from __future__ import annotations

import threading

import pytest

from cinder_cgroup_throttle import cinder_hook, policy
from cinder_cgroup_throttle.cinder_hook import (copying, current_kind, current_volumes,
                                                throttled_class)


def test_copying_nests_and_unwinds():
    assert current_volumes() == ()
    with copying('a', None, 'b'):
        assert current_volumes() == ('a', 'b')
        with copying('c'):
            assert current_volumes() == ('c', 'a', 'b')
        assert current_volumes() == ('a', 'b')
    assert current_volumes() == ()


def test_volumes_are_private_to_a_thread():
    seen = []
    with copying('mine'):
        t = threading.Thread(target=lambda: seen.append(current_volumes()))
        t.start()
        t.join()
    assert seen == [()]


class FakeRealDriver:
    """Stands in for a Cinder driver class: only the method shapes matter here."""

    def __init__(self, configuration=None, host=None):
        self.configuration, self.host = configuration, host

    def create_cloned_volume(self, volume, src_vref):
        return current_volumes()

    def copy_image_to_volume(self, context, volume, image_service, image_id,
                             disable_sparse=False):
        return current_volumes()

    def delete_volume(self, volume):
        return current_volumes()

    def migrate_volume(self, context, volume, host):
        return current_kind(), self.delete_volume(volume)

    def create_volume_from_snapshot(self, volume, snapshot):
        return current_kind()

    def extend_volume(self, volume, new_size):  # not a copy path: not wrapped
        return current_volumes()


def test_throttled_class_keeps_identity_and_records_volumes():
    cls = throttled_class(FakeRealDriver)
    assert cls is throttled_class(FakeRealDriver)
    assert (cls.__name__, cls.__module__) == ('FakeRealDriver', __name__)
    driver = cls(host='h')
    assert isinstance(driver, FakeRealDriver) and driver.host == 'h'
    assert driver.create_cloned_volume('new', src_vref='old') == ('new', 'old')
    assert driver.copy_image_to_volume('ctx', 'vol', 'glance', 'img') == ('vol',)
    assert driver.delete_volume(volume='gone') == ('gone',)
    assert driver.extend_volume('vol', 2) == ()
    with pytest.raises(TypeError):
        driver.delete_volume()


class Context:
    def __init__(self, is_admin):
        self.is_admin = is_admin


def test_wrapped_methods_record_the_copy_kind():
    driver = throttled_class(FakeRealDriver)()
    assert current_kind() == policy.OTHER
    assert driver.create_volume_from_snapshot('new', 'snap') == policy.CLONE
    # the outermost method decides: the delete inside a migration is part of it
    assert driver.migrate_volume(Context(True), 'v', 'h') == (policy.MIGRATION, ('v', 'v'))
    assert driver.migrate_volume(Context(False), 'vol', 'h')[0] == policy.RETYPE
    assert driver.migrate_volume(None, 'vol', 'h')[0] == policy.RETYPE
    with copying('gone', kind=policy.WIPE):
        assert current_kind() == policy.WIPE
    assert current_kind() == policy.OTHER


@pytest.mark.cinder
def test_driver_needs_the_real_class():
    import cinder.volume.driver  # noqa: F401 (installed with requirements.txt)
    from oslo_config import cfg

    from cinder.volume import configuration
    cfg.CONF.register_group(cfg.OptGroup('hook-test'))
    config = configuration.Configuration([], config_group='hook-test')
    with pytest.raises(ValueError, match='throttled_volume_driver'):
        cinder_hook.ThrottledDriver(configuration=config)
    cfg.CONF.set_override('throttled_volume_driver',
                          'cinder_cgroup_throttle.cinder_hook.ThrottledDriver',
                          group='hook-test')
    try:
        with pytest.raises(ValueError, match='real driver class'):
            cinder_hook.ThrottledDriver(configuration=config)
    finally:
        cfg.CONF.clear_override('throttled_volume_driver', group='hook-test')
