"""Every flow that copies, started through Cinder's REST API, on real LVM (VM lane only).

One process runs Cinder's API (noauth), scheduler and two volume services (lvm-1, lvm-2:
two volume groups on loop devices, ``LVMVolumeDriver`` behind our ``ThrottledDriver``; see
cinder_services.py, local_lvm.py). The tests only speak HTTP to it and read the kernel:
they never import the code under test.

Measured per flow: the copy's achieved rate on dd's own clock (a ``dd`` first in the
services' PATH appends dd's statistics to a log and runs the real dd, inside the copy's
cgroup), its bytes, the data (sha256 of 16 regions of 4 MiB spread over the LV, the first
and last MiB included, filled with random data first: a whole GiB costs ~50 s to read
under TCG), the state Cinder ends in, and that no cgroup or registry entry is left.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.kernel, pytest.mark.cinder]

MiB, GiB = 1 << 20, 1 << 30
RATE = 16 * MiB  # a third of what the lane's loop devices copy unthrottled (~45 MB/s)
CLEAR_MIB = 128  # volume_clear_size: the wipe of a deleted volume
PORT = 18776
REGIONS = [i * (GiB // 16) for i in range(16)][:-1] + [GiB - 4 * MiB]
HOST = 'cct-vm'
PROJECT = '0123456789abcdef0123456789abcdef'  # Cinder's routes take hex project ids
RESULTS: List[Dict[str, Any]] = []

LVM_CONF = """\
devices { obtain_device_list_from_udev = 0 external_device_info_source = "none"
          issue_discards = 1 }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
global { event_activation = 0 }
"""

CINDER_CONF = """\
[DEFAULT]
enabled_backends = lvm-1,lvm-2
host = {host}
transport_url = fake:/
auth_strategy = noauth
osapi_volume_listen = 127.0.0.1
osapi_volume_listen_port = {port}
osapi_volume_workers = 1
api_paste_config = {paste}
state_path = {dir}
log_file = {dir}/cinder.log
debug = true
rpc_response_timeout = 300
report_interval = 10
service_down_time = 600
periodic_interval = 10
scheduler_driver_init_wait_time = 5
migration_create_volume_timeout_secs = 600

[database]
connection = sqlite:///{dir}/cinder.sqlite

[oslo_concurrency]
lock_path = {dir}/locks

[coordination]
backend_url = file://{dir}/coordination

[backend_defaults]
volume_driver = cinder_cgroup_throttle.cinder_hook.ThrottledDriver
throttled_volume_driver = tests.e2e.local_lvm.LocalAttachLVMDriver
target_helper = fake
lvm_type = default
lvm_conf_file = {dir}/lvm/lvm.conf
volume_clear = zero
volume_clear_size = {clear}
volume_copy_bps_limit = {rate}
volume_copy_blkio_cgroup_name = {cgroup}
volume_copy_throttle_backend = cgroup
volume_copy_limit_poll_interval = 1

[lvm-1]
volume_group = {vg}-1
volume_backend_name = lvm-1

[lvm-2]
volume_group = {vg}-2
volume_backend_name = lvm-2
"""

DD_WRAPPER = """\
#!/bin/sh
# dd, run for real; its own statistics also go to $CCT_DD_LOG (the tests' clock).
err=$(mktemp)
{dd} "$@" 2>"$err"
rc=$?
{{ echo "ARGV $*"; cat "$err"; echo "RC $rc"; }} >>"$CCT_DD_LOG"
cat "$err" >&2
rm -f "$err"
exit $rc
"""


def run(*argv: str, env: Optional[dict] = None) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True,
                          env=env).stdout


class Cloud:
    """The services, their volume groups and what a test needs to look at them."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix='cct-e2e-', dir='/dev/shm')
        self.vg = 'cct-e2e-%d' % os.getpid()
        self.cgroup = 'cct-e2e-%d' % os.getpid()
        self.state_dir = os.path.join(self.dir, 'state')
        self.dd_log = os.path.join(self.dir, 'dd.log')
        self.lvm_env = dict(os.environ, LVM_SYSTEM_DIR=os.path.join(self.dir, 'lvm'))
        self.loops: List[str] = []
        self.proc: Optional[subprocess.Popen] = None

    # -- set-up and tear-down ----------------------------------------------------------
    def start(self) -> None:
        os.makedirs(os.path.join(self.dir, 'lvm'))
        os.makedirs(os.path.join(self.dir, 'locks'))
        with open(os.path.join(self.dir, 'lvm', 'lvm.conf'), 'w') as f:
            f.write(LVM_CONF)
        for n in (1, 2):
            backing = os.path.join(self.dir, 'pv%d.img' % n)
            with open(backing, 'wb') as f:
                f.truncate(5 * GiB)
            self.loops.append(run('losetup', '-f', '--show', backing).strip())
            run('vgcreate', '%s-%d' % (self.vg, n), self.loops[-1], env=self.lvm_env)
        bindir = os.path.join(self.dir, 'bin')
        os.makedirs(bindir)
        with open(os.path.join(bindir, 'dd'), 'w') as f:
            f.write(DD_WRAPPER.format(dd=shutil.which('dd')))
        os.chmod(os.path.join(bindir, 'dd'), 0o755)
        paste = os.path.join(sys.prefix, 'etc', 'cinder', 'api-paste.ini')
        conf = os.path.join(self.dir, 'cinder.conf')
        with open(conf, 'w') as f:
            f.write(CINDER_CONF.format(host=HOST, port=PORT, paste=paste, dir=self.dir,
                                       clear=CLEAR_MIB, rate=RATE, cgroup=self.cgroup,
                                       vg=self.vg))
        # Every LVM command of the services (Cinder runs some without lvm_conf_file, e.g.
        # listing all VGs for a migration) uses the no-udev configuration.
        env = dict(self.lvm_env, CCT_DD_LOG=self.dd_log,
                   CINDER_CGROUP_THROTTLE_STATE_DIR=self.state_dir,
                   PATH=bindir + os.pathsep + os.path.dirname(sys.executable)
                   + os.pathsep + os.environ['PATH'])
        self.out = open(os.path.join(self.dir, 'services.out'), 'w')
        self.proc = subprocess.Popen(
            [sys.executable, '-W', 'ignore', '-m', 'tests.e2e.cinder_services', conf],
            stdout=self.out, stderr=subprocess.STDOUT, env=env,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        self.wait_for(self._pools_up, 'both LVM pools in the scheduler', timeout=900)

    def _pools_up(self) -> bool:
        assert self.proc.poll() is None, 'the services died: %s' % self.log_tail()
        log = os.path.join(self.dir, 'cinder.log')
        assert not (os.path.exists(log) and 'Failed to initialize driver' in open(log).read()
                    ), self.log_tail(200)
        try:  # not ?detail=true: over fake:// Cinder 29's view fails on a ReadOnlyDict
            pools = self.api('GET', '/scheduler-stats/get_pools')['pools']
        except (OSError, urllib.error.URLError):
            return False
        # A pool is listed once its volume service reported its capabilities.
        return sorted(p['name'] for p in pools) == [
            '%s@lvm-1#lvm-1' % HOST, '%s@lvm-2#lvm-2' % HOST]

    def log_tail(self, lines: int = 30) -> str:
        """The services' output, the last ``lines`` of Cinder's log and its problems."""
        text = ''
        for name in ('services.out', 'cinder.log'):
            path = os.path.join(self.dir, name)
            if os.path.exists(path):
                log = open(path).readlines()
                problems = [line[:600] for line in log
                            if re.search(r' (ERROR|WARNING) |Traceback|Error', line)]
                text += ('--- %s problems\n' % name + ''.join(problems[-80:]) +
                         '--- %s tail\n' % name + ''.join(log[-lines:]))
        sys.__stdout__.write(text)  # whole: pytest shortens assertion messages
        return text

    def stop(self) -> List[str]:
        problems = []
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for n in (1, 2):
            subprocess.run(['vgremove', '-f', '%s-%d' % (self.vg, n)], env=self.lvm_env,
                           capture_output=True)
        for loop in self.loops:
            subprocess.run(['losetup', '-d', loop], capture_output=True)
        parent = os.path.join('/sys/fs/cgroup', self.cgroup)
        if os.path.isdir(parent):
            leaves = [d for d in os.listdir(parent)
                      if os.path.isdir(os.path.join(parent, d))]
            for leaf in leaves:
                os.rmdir(os.path.join(parent, leaf))
            os.rmdir(parent)
            if leaves:
                problems.append('cgroups left behind: %s' % leaves)
        shutil.rmtree(self.dir, ignore_errors=True)
        return problems

    # -- REST ----------------------------------------------------------------------------
    def api(self, method: str, path: str, body: Optional[dict] = None,
            version: str = '3.0') -> Any:
        request = urllib.request.Request(
            'http://127.0.0.1:%d/v3/%s%s' % (PORT, PROJECT, path), method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={'X-Auth-Token': 'admin:%s' % PROJECT,
                     'Content-Type': 'application/json',
                     'OpenStack-API-Version': 'volume %s' % version})
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
        return json.loads(data) if data else None

    def volume(self, vid: str) -> Optional[dict]:
        try:
            return self.api('GET', '/volumes/%s' % vid)['volume']
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def wait_for(self, cond, what: str, timeout: float = 600, every: float = 2) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = cond()
            if found:
                return found
            time.sleep(every)
        raise AssertionError('timed out waiting for %s\n%s' % (what, self.log_tail()))

    def wait_volume(self, vid: str, **expected: str) -> dict:
        def reached() -> Optional[dict]:
            vol = self.volume(vid)
            assert vol is not None, 'volume %s vanished' % vid
            assert not vol['status'].startswith('error'), (vol, self.log_tail())
            assert vol.get('migration_status') != 'error', (vol, self.log_tail())
            return vol if all(vol.get(k) == v for k, v in expected.items()) else None
        return self.wait_for(reached, 'volume %s to be %s' % (vid, expected))

    def wait_deleted(self, vid: str) -> None:
        def gone() -> bool:
            vol = self.volume(vid)
            assert vol is None or vol['status'] != 'error_deleting', self.log_tail()
            return vol is None
        self.wait_for(gone, 'volume %s to be deleted' % vid)

    def create_type(self, name: str, backend: str) -> str:
        body = {'volume_type': {'name': name,
                                'extra_specs': {'volume_backend_name': backend}}}
        return self.api('POST', '/types', body)['volume_type']['id']

    def create_volume(self, volume_type: Optional[str], **extra: Any) -> dict:
        """A 1 GiB volume; type None: the default type, on whichever backend the scheduler
        picks (a type naming a backend could not migrate to the other one)."""
        body = {'volume': dict({'size': 1}, **extra)}
        if volume_type:
            body['volume']['volume_type'] = volume_type
        vid = self.api('POST', '/volumes', body)['volume']['id']
        return self.wait_volume(vid, status='available')

    # -- the kernel's and LVM's view ---------------------------------------------------
    def lv_path(self, vol: dict) -> str:
        backend = vol['os-vol-host-attr:host'].split('@')[1].split('#')[0]
        name_id = vol.get('os-vol-mig-status-attr:name_id') or vol['id']
        return '/dev/%s-%s/volume-%s' % (self.vg, backend[-1], name_id)

    def lvs(self) -> List[str]:
        out = run('lvs', '--noheadings', '-o', 'vg_name,lv_name', env=self.lvm_env)
        return sorted('/'.join(line.split()) for line in out.splitlines() if line.strip())

    def fill(self, path: str) -> str:
        with open(path, 'r+b', buffering=0) as f:
            for offset in REGIONS:
                f.seek(offset)
                f.write(os.urandom(4 * MiB))
            os.fsync(f.fileno())
        return self.digest(path)

    @staticmethod
    def digest(path: str) -> str:
        h = hashlib.sha256()
        with open(path, 'rb', buffering=0) as f:
            for offset in REGIONS:
                f.seek(offset)
                h.update(f.read(4 * MiB))
        return h.hexdigest()

    def dd_mark(self) -> int:
        return os.path.getsize(self.dd_log) if os.path.exists(self.dd_log) else 0

    def copies_since(self, mark: int) -> List[Dict[str, Any]]:
        """dd runs of volume copies (count= in bytes) since ``mark``, with dd's own time."""
        with open(self.dd_log) as f:
            f.seek(mark)
            text = f.read()
        copies = []
        for block in re.findall(r'^ARGV (.*?)^RC (\d+)$', text, re.M | re.S):
            argv, rc = block
            first = argv.splitlines()[0]
            ops = dict(a.split('=', 1) for a in first.split() if '=' in a)
            if 'count_bytes' not in ops.get('iflag', ''):
                continue  # Cinder's O_DIRECT probes
            stats = re.search(r'^(\d+) bytes .* copied, ([\d.]+) s', argv, re.M)
            assert rc == '0' and stats, 'dd failed: %s' % argv
            copies.append({'src': ops['if'], 'dst': ops['of'],
                           'bytes': int(stats.group(1)), 'seconds': float(stats.group(2))})
        return copies

    def leftovers(self) -> List[str]:
        found = []
        parent = os.path.join('/sys/fs/cgroup', self.cgroup)
        if os.path.isdir(parent):
            found += ['cgroup ' + d for d in os.listdir(parent)
                      if os.path.isdir(os.path.join(parent, d))]
        if os.path.isdir(self.state_dir):
            found += ['registry ' + n for n in os.listdir(self.state_dir)
                      if n.endswith('.json')]
        return found

    def cli(self, *args: str) -> Any:
        argv = [os.path.join(os.path.dirname(sys.executable), 'cinder-cgroup-throttle'),
                '--state-dir', self.state_dir, '--cgroup-name', self.cgroup] + list(args)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout


@pytest.fixture(scope='module')
def cloud(kernel_ready):
    c = Cloud()
    try:
        c.start()
        c.types = {name: c.create_type(name, name) for name in ('lvm-1', 'lvm-2')}
        yield c
    finally:
        problems = c.stop()
        if RESULTS:
            rows = [('flow', 'copy', 'MiB', 'dd s', 'rate MiB/s', 'limit', 'ratio')]
            rows += [(r['flow'], r['kind'], '%d' % (r['bytes'] // MiB), '%.2f' % r['seconds'],
                      '%.2f' % (r['rate'] / MiB), '%.0f' % (r['limit'] / MiB),
                      '%.3f' % (r['rate'] / r['limit'])) for r in RESULTS]
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            table = '\n'.join(' | '.join(c.ljust(w) for c, w in zip(row, widths))
                              for row in rows)
            sys.__stdout__.write('\nflows through Cinder\'s API (VM lane):\n%s\n' % table)
            sys.__stdout__.flush()
        assert not problems, problems


def check_copies(cloud: Cloud, flow: str, mark: int, expected: List[tuple],
                 limit: int = RATE) -> None:
    """The copies since ``mark`` are ``expected`` [(kind, bytes)] in order, each at its limit."""
    copies = cloud.copies_since(mark)
    kinds = [('wipe' if c['src'] == '/dev/zero' else 'data', c['bytes']) for c in copies]
    assert kinds == expected, copies
    for c, (kind, _) in zip(copies, expected):
        rate = c['bytes'] / c['seconds']
        RESULTS.append(dict(c, flow=flow, kind=kind, rate=rate, limit=limit))
        assert 0.97 <= rate / limit <= 1.02, '%s %s: %.3f of the limit' % (flow, kind,
                                                                           rate / limit)
    assert cloud.leftovers() == []


def other_backend(vol: dict) -> str:
    backend = 'lvm-2' if vol['os-vol-host-attr:host'].endswith('#lvm-1') else 'lvm-1'
    return '%s@%s#%s' % (HOST, backend, backend)


def start_migration(cloud: Cloud, force_host_copy: bool, volume_type=None) -> tuple:
    """A new volume filled with data, migrating to the other backend (its copy running)."""
    vol = cloud.create_volume(volume_type)
    digest = cloud.fill(cloud.lv_path(vol))
    mark = cloud.dd_mark()
    vol['destination'] = other_backend(vol)
    cloud.api('POST', '/volumes/%s/action' % vol['id'],
              {'os-migrate_volume': {'host': vol['destination'],
                                     'force_host_copy': force_host_copy}})

    def copying() -> bool:
        if cloud.leftovers():
            return True
        status = cloud.volume(vol['id'])
        assert status['migration_status'] != 'error', (status, cloud.log_tail())
        return False
    cloud.wait_for(copying, 'the migration copy to start', every=0.5)
    return vol, digest, mark


def test_driver_assisted_migration(cloud):
    vol, digest, mark = start_migration(cloud, force_host_copy=False)
    during = json.loads(cloud.cli('status', '--volume', vol['id'], '--json'))
    assert during['state'] in ('starting', 'copying') and during['copies'], during
    assert re.match(r'^\d+%$', during['progress']) and during['progress'] != '100%'
    done = cloud.wait_volume(vol['id'], migration_status='success', status='available')
    assert done['os-vol-host-attr:host'] == vol['destination']
    assert cloud.digest(cloud.lv_path(done)) == digest
    # LVM copies to the other VG, then deletes (and wipes) the source LV.
    check_copies(cloud, 'migrate (driver)', mark, [('data', GiB), ('wipe', CLEAR_MIB * MiB)])
    after = json.loads(cloud.cli('status', '--volume', vol['id'], '--json'))
    assert (after['progress'], after['state']) == ('100%', 'done'), after
    assert not [lv for lv in cloud.lvs() if lv.endswith('/volume-%s' % vol['id'])
                and not cloud.lv_path(done).endswith(lv)]
    cloud.volume_ids = [vol['id']]


def test_generic_migration(cloud):
    vol, digest, mark = start_migration(cloud, force_host_copy=True)
    metrics = cloud.cli('metrics')
    assert re.search(r'^cinder_volume_copy_bytes_total\{copy="copy-\d+-[0-9a-f]{8}",'
                     r'volume="%s",kind="data",backend="cgroup"\} %d$' % (vol['id'], GiB),
                     metrics, re.M), metrics
    done = cloud.wait_volume(vol['id'], migration_status='success', status='available')
    assert done['os-vol-host-attr:host'] == vol['destination']
    assert cloud.digest(cloud.lv_path(done)) == digest
    # The source volume (now the temporary one) is deleted after the swap: its wipe.
    cloud.wait_for(lambda: len(cloud.copies_since(mark)) == 2, 'the old volume\'s wipe')
    check_copies(cloud, 'migrate --force-host-copy', mark,
                 [('data', GiB), ('wipe', CLEAR_MIB * MiB)])
    progress = json.loads(cloud.cli('status', '--volume', vol['id'], '--json'))
    assert progress['progress'] == '100%', progress
    cloud.volume_ids.append(vol['id'])


def test_retype_with_on_demand_migration(cloud):
    vol = cloud.create_volume('lvm-1')
    digest = cloud.fill(cloud.lv_path(vol))
    mark = cloud.dd_mark()
    cloud.api('POST', '/volumes/%s/action' % vol['id'],
              {'os-retype': {'new_type': 'lvm-2', 'migration_policy': 'on-demand'}})
    done = cloud.wait_for(
        lambda: (lambda v: v if v['volume_type'] == 'lvm-2' and v['status'] == 'available'
                 and v.get('migration_status') == 'success' else None)(
                     cloud.wait_volume(vol['id'])), 'the retype')
    assert done['os-vol-host-attr:host'] == '%s@lvm-2#lvm-2' % HOST
    assert cloud.digest(cloud.lv_path(done)) == digest
    cloud.wait_for(lambda: len(cloud.copies_since(mark)) == 2, 'the old volume\'s wipe')
    check_copies(cloud, 'retype on-demand', mark, [('data', GiB), ('wipe', CLEAR_MIB * MiB)])
    cloud.volume_ids.append(vol['id'])


def test_clone(cloud):
    src = cloud.create_volume('lvm-1')
    digest = cloud.fill(cloud.lv_path(src))
    mark = cloud.dd_mark()
    clone = cloud.create_volume('lvm-1', source_volid=src['id'])
    assert cloud.digest(cloud.lv_path(clone)) == digest
    # LVM copies from a temporary snapshot, then deletes (wipes) the snapshot.
    cloud.wait_for(lambda: len(cloud.copies_since(mark)) == 2, 'the snapshot\'s wipe')
    check_copies(cloud, 'clone', mark, [('data', GiB), ('wipe', CLEAR_MIB * MiB)])
    cloud.volume_ids += [clone['id'], src['id']]


def test_delete_wipes_each_volume(cloud):
    for vid in cloud.volume_ids:
        vol = cloud.volume(vid)
        lv = cloud.lv_path(vol)
        mark = cloud.dd_mark()
        cloud.api('DELETE', '/volumes/%s' % vid)
        cloud.wait_deleted(vid)
        check_copies(cloud, 'delete (volume_clear=zero)', mark, [('wipe', CLEAR_MIB * MiB)])
        assert lv.split('/dev/')[1] not in cloud.lvs()
    assert cloud.lvs() == []


def _leaf_limit(cloud: Cloud) -> Optional[tuple]:
    parent = os.path.join('/sys/fs/cgroup', cloud.cgroup)
    for leaf in os.listdir(parent) if os.path.isdir(parent) else []:
        path = os.path.join(parent, leaf)
        if not os.path.isdir(path):
            continue
        for line in open(os.path.join(path, 'io.max')):
            fields = dict(kv.split('=') for kv in line.split()[1:])
            if fields.get('wbps', 'max') != 'max':
                return path, line.split()[0], int(fields['wbps'])
    return None


def _written(leaf: str, majmin: str) -> int:
    for line in open(os.path.join(leaf, 'io.stat')):
        if line.startswith(majmin + ' '):
            return int(dict(kv.split('=') for kv in line.split()[1:])['wbytes'])
    return 0


def _counter_rate(leaf: str, majmin: str, seconds: float = 6) -> float:
    before, t0 = _written(leaf, majmin), time.monotonic()
    time.sleep(seconds)
    return (_written(leaf, majmin) - before) / (time.monotonic() - t0)


def test_limits_change_live_through_the_api(cloud):
    """A back-end QoS spec raises the copy rate of a running migration (admin), then the
    volume's metadata lowers it (user): each in force within 5 s, read from the cgroup."""
    qos = cloud.api('POST', '/qos-specs', {'qos_specs': {
        'name': 'copy-rate', 'consumer': 'back-end', 'volume_copy_bps_limit': '8Mi'}})
    qos_id = qos['qos_specs']['id']
    type_id = cloud.api('POST', '/types', {'volume_type': {'name': 'copy-qos'}}
                        )['volume_type']['id']  # no backend: it may migrate anywhere
    cloud.api('GET', '/qos-specs/%s/associate?vol_type_id=%s' % (qos_id, type_id))
    vol, digest, _mark = start_migration(cloud, force_host_copy=False,
                                         volume_type='copy-qos')
    leaf, majmin, limit = cloud.wait_for(lambda: _leaf_limit(cloud), 'the copy', every=0.2)
    assert limit == 8 * MiB
    seen = []
    for change, expected in (
            (lambda: cloud.api('PUT', '/qos-specs/%s' % qos_id,
                               {'qos_specs': {'volume_copy_bps_limit': '24Mi'}}), 24 * MiB),
            (lambda: cloud.api('POST', '/volumes/%s/metadata' % vol['id'],
                               {'metadata': {'volume_copy_bps_limit': '12Mi'}}), 12 * MiB)):
        t0 = time.monotonic()
        change()
        cloud.wait_for(lambda: _leaf_limit(cloud)[2] == expected,
                       'the new limit', timeout=5, every=0.1)
        delay = time.monotonic() - t0
        rate = _counter_rate(leaf, majmin)
        seen.append((expected, delay, rate))
        sys.__stdout__.write('\nlimit %d MiB/s through the API: in force after %.2f s, '
                             'then %.3f of it (cgroup counters)\n'
                             % (expected // MiB, delay, rate / expected))
        assert delay < 5
        assert 0.9 <= rate / expected <= 1.05
    done = cloud.wait_volume(vol['id'], migration_status='success', status='available')
    assert cloud.digest(cloud.lv_path(done)) == digest
    cloud.wait_for(lambda: not cloud.leftovers(), 'the copies to end')
    cloud.api('DELETE', '/volumes/%s' % vol['id'])
    cloud.wait_deleted(vol['id'])
