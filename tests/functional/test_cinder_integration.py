"""The one-step enabling in a real cinder-volume, and volume metadata on Cinder's own paths.

A real Cinder 29 ``VolumeManager`` is built from a real cinder.conf (sqlite database
migrated with Cinder's own ``db_sync``, oslo.messaging's in-process ``fake://``
transport with a real RPC server for the manager), exactly as cinder-volume builds it:
``volume_driver = cinder_cgroup_throttle.cinder_hook.ThrottledDriver`` with
``throttled_volume_driver = cinder.volume.drivers.lvm.LVMVolumeDriver``. The manager's
``driver.set_throttle()`` (what ``_init_host`` calls) must install our throttle.

Generic migration runs Cinder's real ``VolumeManager._copy_volume_data`` on volumes stored in
the database with (admin) metadata. Only the attachment is replaced: in production it is an
iSCSI/FC connection to the backend (LVM needs device-mapper, absent here); here a volume
"attaches" as a loop device. Volumes are 1 GB in the database, so dd is asked for 1 GiB and
copies the 32 MiB loop device to its end.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile

import pytest

from cinder_cgroup_throttle.registry import Registry
from tests.scratch import LeafRateProbe, MiB, dd_seconds, fill_random, sha256_prefix

pytestmark = [pytest.mark.kernel, pytest.mark.cinder]

BACKEND_RATE = 8 * MiB  # [backend_defaults]; [DEFAULT] says 2 MiB/s, which must lose
KEY = 'volume_copy_bps_limit'
HOST = socket.gethostname()
DEVICE_SIZE = 32 * MiB
FLOOR = 4 * MiB  # volume_copy_min_bps_limit: the least a tenant's metadata can ask for
LOW, HIGH = 0.97, 1.03  # the copy leaf's byte counter over 10-90 % of the copy


def leaf_rate(probe, size: int, expected: float, what: str) -> float:
    """The one copy leaf the probe saw wrote ``size`` bytes at ``expected`` bytes/s."""
    (leaf,) = probe.series
    # The copy ran in what the probe watched. Its last block may end with the
    # process or leaf before the next sample; completeness is checked elsewhere.
    assert probe.total(leaf) >= 0.9 * size, probe.series
    rate = probe.rate(leaf)
    print('%s: %.2f MiB/s, achieved/limit %.3f' % (what, rate / MiB, rate / expected))
    assert LOW <= rate / expected <= HIGH, '%s: achieved/limit %.3f' % (what, rate / expected)
    return rate


CINDER_CONF = """\
[DEFAULT]
enabled_backends = lvm-1,lvm-2
transport_url = fake:/
rpc_response_timeout = 10
state_path = {dir}
volume_copy_bps_limit = 2097152

[database]
connection = sqlite:///{dir}/cinder.sqlite

[oslo_concurrency]
lock_path = {dir}

[backend_defaults]
volume_copy_bps_limit = {rate}
volume_copy_blkio_cgroup_name = {cgroup}
volume_copy_throttle_backend = cgroup
volume_copy_min_bps_limit = {floor}

[lvm-1]
volume_driver = cinder_cgroup_throttle.cinder_hook.ThrottledDriver
throttled_volume_driver = cinder.volume.drivers.lvm.LVMVolumeDriver
volume_backend_name = lvm-1
target_helper = fake

[lvm-2]
volume_driver = cinder_cgroup_throttle.cinder_hook.ThrottledDriver
throttled_volume_driver = cinder.volume.drivers.lvm.LVMVolumeDriver
volume_backend_name = lvm-2
target_helper = fake
# Explicit 0: this backend is not throttled (Cinder itself would fall back to [DEFAULT]).
volume_copy_bps_limit = 0
"""


@pytest.fixture(scope='module')
def cinder_volume(cinder_modules, cgroup_parent):
    """Two real VolumeManagers (lvm-1, lvm-2) of one cinder.conf; lvm-1 serves RPC."""
    import oslo_messaging as messaging
    import os_brick.privileged
    from oslo_config import cfg

    from cinder import context, objects, rpc, version
    from cinder.common import config  # noqa: F401  (registers Cinder's options)
    from cinder.common import constants
    from cinder.db import migration

    objects.register_all()  # before cinder.volume.manager, whose imports need objects
    from cinder.volume import manager as volume_manager

    # Root in-process: os-brick's privsep (connector properties) without its daemon.
    os_brick.privileged.default.set_client_mode(False)
    workdir = tempfile.mkdtemp(prefix='cct-cinder-')
    path = os.path.join(workdir, 'cinder.conf')
    with open(path, 'w') as f:
        f.write(CINDER_CONF.format(dir=workdir, rate=BACKEND_RATE, cgroup=cgroup_parent,
                                   floor=FLOOR))
    conf = cfg.CONF
    conf([], project='cinder', version=version.version_string(), default_config_files=[path])
    migration.db_sync()
    rpc.init(conf)

    class LoopAttachManager(volume_manager.VolumeManager):
        """The real manager; only attaching a volume is a loop device (see module doc)."""

        devices: dict = {}

        def _attach_volume(self, ctxt, volume, properties, remote=False,
                           attach_encryptor=False):
            return {'device': {'path': self.devices[volume.id]}, 'connector': None}

        def _detach_volume(self, *args, **kwargs):
            pass

    managers = {name: LoopAttachManager(service_name=name, host='%s@%s' % (HOST, name))
                for name in ('lvm-1', 'lvm-2')}
    # How cinder.service.Service listens for a backend since RPC 3.6.
    server = rpc.get_server(messaging.Target(topic='%s.%s@lvm-1' % (constants.VOLUME_TOPIC,
                                                                    HOST), server=HOST),
                            [managers['lvm-1']])
    server.start()
    try:
        yield managers, context.get_admin_context()
    finally:
        server.stop()
        server.wait()
        rpc.cleanup()
        conf.clear()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def set_throttle(cinder_volume, cinder_modules, state_dir):
    """Run a manager's ``driver.set_throttle()``; restore Cinder's default afterwards."""
    throttling = cinder_modules[1]
    previous = throttling.Throttle.DEFAULT
    installed = []

    def run(backend: str):
        driver = cinder_volume[0][backend].driver
        driver.set_throttle()
        installed.append(driver._throttle)
        return driver._throttle

    yield run
    throttling.Throttle.set_default(previous)
    for throttle in installed:
        leftovers = throttle.manager.driver.leaves() if throttle.manager.driver else []
        assert not leftovers, 'cgroups left behind: %s' % leftovers
    assert not Registry(state_dir).entries()


def test_config_step_installs_our_throttle(scratch, cinder_volume, cinder_modules,
                                           set_throttle, cgroup_parent):
    from cinder.volume.drivers.lvm import LVMVolumeDriver

    from cinder_cgroup_throttle.cinder_hook import PolicyThrottle
    _, throttling, volume_utils, _ = cinder_modules
    driver = cinder_volume[0]['lvm-1'].driver
    assert isinstance(driver, LVMVolumeDriver)
    assert type(driver).__name__ == 'LVMVolumeDriver'
    throttle = set_throttle('lvm-1')
    assert throttling.Throttle.get_default() is throttle
    assert isinstance(throttle, PolicyThrottle)
    assert throttle.config.bps_limit == BACKEND_RATE
    src, dst = scratch.loop(32), scratch.loop(32)
    digest = fill_random(src, 24 * MiB)
    with LeafRateProbe(cgroup_parent) as probe:
        volume_utils.copy_volume(src, dst, 24, '1M')
    assert sha256_prefix(dst, 24 * MiB) == digest
    leaf_rate(probe, 24 * MiB, BACKEND_RATE, 'copy_volume under the installed throttle')


def test_explicit_zero_in_backend_section_disables(scratch, cinder_modules, set_throttle,
                                                   caplog, cgroup_parent):
    volume_utils = cinder_modules[2]
    throttle = set_throttle('lvm-2')
    assert throttle.config.bps_limit == 0
    src, dst = scratch.loop(32), scratch.loop(32)
    fill_random(src, 24 * MiB)
    errs = []

    def execute(*cmd, **kw):  # Cinder's own executor; keeps dd's summary (its own clock)
        out, err = cinder_modules[0].utils.execute(*cmd, **kw)
        errs.append(err)
        return out, err

    with LeafRateProbe(cgroup_parent) as probe:
        with caplog.at_level(logging.DEBUG, logger='oslo_concurrency.processutils'):
            volume_utils.copy_volume(src, dst, 24, '1M', execute=execute)
    assert probe.series == {}, 'an unthrottled copy got a cgroup: %s' % probe.series
    rate = 24 * MiB / dd_seconds(errs[-1])
    commands = re.findall(r'Running cmd \(subprocess\): (.*)', caplog.text)
    copies = [c for c in commands if 'count=%d' % (24 * MiB) in c]
    print('lvm-2 (volume_copy_bps_limit = 0): %.1f MiB/s, unthrottled: %s'
          % (rate / MiB, copies))
    assert len(copies) == 1 and copies[0].startswith('dd if=%s ' % src)
    assert rate > 1.5 * BACKEND_RATE


@pytest.mark.parametrize('user, admin, user_context, expected', [
    ('6Mi', None, True, 6 * MiB),
    ('6Mi', None, False, BACKEND_RATE),
    ('1', None, True, FLOOR),
    ('32Mi', None, True, BACKEND_RATE),
    (None, '16Mi', False, 16 * MiB),
    (None, '16Mi', True, 16 * MiB),
    ('not-a-rate', None, True, BACKEND_RATE),
], ids=['user-lowers-tenant-retype', 'user-cannot-slow-admin-migration',
        'user-cannot-go-below-floor', 'user-cannot-raise', 'admin-raises',
        'admin-raises-user-context', 'invalid-ignored'])
def test_migration_copy_honours_volume_metadata(scratch, cinder_volume, set_throttle, caplog,
                                                cgroup_parent, user, admin, user_context,
                                                expected):
    """``user_context``: a tenant's retype; the volumes were loaded by a non-admin request,
    so Cinder did not load their admin metadata: the hook must read it itself. Else an
    admin's migration, which a tenant's metadata must not slow down."""
    from cinder import context, objects
    from cinder.volume import manager as volume_manager
    managers, ctxt = cinder_volume
    manager = managers['lvm-1']
    set_throttle('lvm-1')

    def volume(metadata):
        vol = objects.Volume(context=ctxt, size=1, host='%s@lvm-1#lvm-1' % HOST,
                             status='available', project_id='p', user_id='u',
                             metadata=metadata)
        vol.create()
        return vol

    src = volume({KEY: user} if user else {})
    if admin:
        src.admin_metadata_update({KEY: admin}, delete=False)  # admin-only in Cinder's API
    src = objects.Volume.get_by_id(ctxt, src.id)  # as migrate_volume loads it
    assert src.metadata.get(KEY) == user and src.admin_metadata.get(KEY) == admin
    # The migration target, made as _migrate_volume_generic makes it: a copy of the
    # source's fields (its metadata and admin metadata included).
    skip = ({'snapshot_id', 'source_volid', 'host', 'cluster_name', 'availability_zone'}
            | manager._VOLUME_CLONE_SKIP_PROPERTIES)
    dst = objects.Volume(context=ctxt, host='%s@lvm-1#lvm-1' % HOST, status='creating',
                         **{k: src[k] for k in set(src.keys()) - skip})
    dst.create()
    assert dst.metadata == src.metadata and dst.admin_metadata == src.admin_metadata
    if user_context:
        ctxt = context.RequestContext(user_id='u', project_id='p')
        src, dst = (objects.Volume.get_by_id(ctxt, v.id) for v in (src, dst))
        assert src.admin_metadata == {}  # what Cinder shows a non-admin
    manager.devices = {src.id: scratch.loop(32), dst.id: scratch.loop(32)}
    digest = fill_random(manager.devices[src.id], DEVICE_SIZE)
    assert getattr(volume_manager.VolumeManager._copy_volume_data,
                   '__cinder_cgroup_throttle__', False)
    with LeafRateProbe(cgroup_parent) as probe:
        manager._copy_volume_data(ctxt, src, dst)
    assert sha256_prefix(manager.devices[dst.id], DEVICE_SIZE) == digest
    leaf_rate(probe, DEVICE_SIZE, expected,
              '_copy_volume_data, metadata %r admin %r' % (user, admin))


def test_wipe_of_a_deleted_volume_ignores_tenant_metadata(scratch, cinder_modules,
                                                          set_throttle, cgroup_parent):
    """Cinder's own clear_volume (LVM's delete_volume wipes with it), inside what the
    wrapped ``delete_volume`` records: a tenant's 1 B/s cannot leave it in 'deleting'."""
    from cinder_cgroup_throttle import cinder_hook, policy
    volume_utils = cinder_modules[2]
    set_throttle('lvm-1')
    device = scratch.loop(32)
    gone = {'id': 'deleted-volume', 'metadata': {KEY: '1'}, 'admin_metadata': {}}
    with LeafRateProbe(cgroup_parent) as probe:
        with cinder_hook.copying(gone, kind=policy.WIPE):
            volume_utils.clear_volume(1, device, volume_clear='zero',
                                      volume_clear_size=DEVICE_SIZE // MiB)
    with open(device, 'rb') as f:
        assert f.read(DEVICE_SIZE) == bytes(DEVICE_SIZE)
    leaf_rate(probe, DEVICE_SIZE, BACKEND_RATE, 'wipe with tenant metadata 1 B/s')


def _leaf_of(state_dir: str, volume_id: str) -> str:
    """The copy's leaf cgroup directory, from its registry entry (plain JSON)."""
    import json
    for name in os.listdir(state_dir) if os.path.isdir(state_dir) else []:
        if name.startswith('copy-') and name.endswith('.json') and name.count('.') == 1:
            entry = json.load(open(os.path.join(state_dir, name)))
            if entry['volume_id'] == volume_id:
                controller, path = entry['cgroup'].split(':', 1)
                return os.path.join(entry['mountpoint'], path)
    return ''


def _write_limit(leaf: str, majmin: str) -> int:
    """The write limit on ``majmin`` that the kernel reports for the leaf (0: none)."""
    if os.path.exists(os.path.join(leaf, 'io.max')):
        for line in open(os.path.join(leaf, 'io.max')):
            if line.startswith(majmin + ' '):
                wbps = dict(kv.split('=') for kv in line.split()[1:])['wbps']
                return 0 if wbps == 'max' else int(wbps)
        return 0
    for line in open(os.path.join(leaf, 'blkio.throttle.write_bps_device')):
        if line.split()[0] == majmin:
            return int(line.split()[1])
    return 0


def test_admin_metadata_change_relimits_a_running_migration_copy_and_progress(
        scratch, cinder_volume, set_throttle, state_dir, cgroup_parent):
    """Cinder's generic-migration copy (an admin's: user metadata does not apply); the
    volume's admin metadata is lowered in the database (what the admin metadata API does)
    mid-copy: the copy's cgroup limit and its measured rate follow within the watcher's
    poll; the driver reports the migration's progress."""
    import threading
    import time

    from cinder import objects
    from cinder.db import api as db
    managers, ctxt = cinder_volume
    manager = managers['lvm-1']
    set_throttle('lvm-1')
    vols = []
    for _ in range(2):
        vol = objects.Volume(context=ctxt, size=1, host='%s@lvm-1#lvm-1' % HOST,
                             status='available', project_id='p', user_id='u')
        vol.create()
        vols.append(vol)
    src, dst = vols
    manager.devices = {src.id: scratch.loop(40), dst.id: scratch.loop(40)}
    digest = fill_random(manager.devices[src.id], 40 * MiB)
    rdev = os.stat(manager.devices[dst.id]).st_rdev
    majmin = '%d:%d' % (os.major(rdev), os.minor(rdev))
    assert manager.driver.get_migrate_volume_progress(ctxt, src) == 'NA'
    errors = []

    def migrate_copy():
        try:
            manager._copy_volume_data(ctxt, src, dst)
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    worker = threading.Thread(target=migrate_copy)
    with LeafRateProbe(cgroup_parent) as probe:
        worker.start()
        try:
            deadline = time.monotonic() + 30
            leaf = ''
            while not (leaf and probe.series.get(os.path.basename(leaf))
                       and probe.series[os.path.basename(leaf)][-1][1] > 2 * MiB):
                assert time.monotonic() < deadline and worker.is_alive(), errors
                time.sleep(0.05)
                leaf = _leaf_of(state_dir, src.id)
            assert _write_limit(leaf, majmin) == BACKEND_RATE
            # dd copies the 40 MiB device, of the 1 GiB it is asked for: a few MiB are 0%.
            assert manager.driver.get_migrate_volume_progress(ctxt, src) == '0%'
            changed = time.monotonic()
            db.volume_admin_metadata_update(ctxt, src.id, {KEY: '2Mi'}, False)
            while _write_limit(leaf, majmin) != 2 * MiB:
                assert time.monotonic() - changed < 5, 'limit not changed within 5 s'
                time.sleep(0.05)
            seconds = time.monotonic() - changed
            t0 = time.monotonic()
            time.sleep(4)
            rate = probe.window(os.path.basename(leaf), t0, time.monotonic())
        finally:
            worker.join(120)
    print('admin metadata lowered to 2 MiB/s: limit changed after %.2f s, then '
          'achieved/limit %.3f (leaf byte counter)' % (seconds, rate / (2 * MiB)))
    assert 0.9 <= rate / (2 * MiB) <= 1.1
    assert not errors, errors
    assert sha256_prefix(manager.devices[dst.id], 40 * MiB) == digest
    assert manager.driver.get_migrate_volume_progress(ctxt, src) == '100%'
    assert not os.path.exists(leaf)
