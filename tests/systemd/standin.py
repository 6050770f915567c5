"""A stand-in for cinder-volume, run by systemd in the VM lane (tests/systemd).

It starts as cinder-volume does (``cinder/cmd/volume.py``): eventlet monkey-patching before
anything else, then Cinder's config and privsep's root helper, then the throttle installed
as ``BaseVD.set_throttle`` installs it (cinder_hook.PolicyThrottle from cinder.conf,
``Throttle.set_default``). Copies
go through Cinder 29's real ``volume_utils.copy_volume`` and ``image_utils.convert_image``,
each in its own greenthread, so several run at once as in a real volume service.

    python -S standin.py CINDER_CONF SPOOL SITE_DIR

The test drops jobs as SPOOL/jobs/<name>.json ({"kind": "copy"|"convert", "src", "dst",
"size_mb"}) and reads SPOOL/results/<name>.json: {"ok", "error", "stderr" (dd's, for
its own clock), "pid"}. SPOOL/results/ready-<pid>.json says the service is up.
"""
import site
import sys

site.addsitedir(sys.argv[3])  # the venv's packages (python -S: the service user's python)
from cinder import monkey_patch  # noqa: E402  (first, as cinder/cmd/volume.py does)

monkey_patch.patch()

import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import eventlet  # noqa: E402
from oslo_config import cfg  # noqa: E402
from oslo_privsep import priv_context  # noqa: E402

from cinder.common import config  # noqa: E402,F401  (registers rootwrap_config)
from cinder.image import image_utils  # noqa: E402
from cinder import utils  # noqa: E402
from cinder.volume import throttling, volume_utils  # noqa: E402

from cinder_cgroup_throttle import cinder_hook, policy  # noqa: E402


def write_json(path, data):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(data, f)
    os.rename(tmp, path)


def run_job(spool, name, job, throttle):
    result = {'ok': False, 'error': None, 'stderr': '', 'pid': os.getpid()}
    try:
        if job['kind'] == 'copy':
            def execute(*cmd, **kwargs):
                out, err = utils.execute(*cmd, **kwargs)
                result['stderr'] += err
                return out, err
            volume_utils.copy_volume(job['src'], job['dst'], job['size_mb'], '1M',
                                     execute=execute)
        else:
            image_utils.convert_image(job['src'], job['dst'], 'raw', src_format='raw',
                                      run_as_root=True)
        result['ok'] = True
    except Exception as exc:  # reported to the test, which decides
        result['error'] = '%s: %s\n%s' % (type(exc).__name__, exc, traceback.format_exc())
    write_json(os.path.join(spool, 'results', name + '.json'), result)


def main():
    conf, spool = sys.argv[1:3]
    cfg.CONF(['--config-file', conf], project='cinder', default_config_files=[])
    priv_context.init(root_helper=shlex.split(utils.get_root_helper()))  # as volume.py
    throttle = cinder_hook.PolicyThrottle(policy.load_config(cfg.CONF, None))
    throttling.Throttle.set_default(throttle)
    driver = throttle.manager.driver
    jobs = os.path.join(spool, 'jobs')
    seen = set(os.listdir(jobs))  # a restarted service does not redo its predecessor's
    write_json(os.path.join(spool, 'results', 'ready-%d.json' % os.getpid()), {
        'pid': os.getpid(), 'uid': os.getuid(),
        'cgroup': open('/proc/self/cgroup').read().strip(),
        'driver': type(driver).__name__ if driver else None,
        'parent': driver.parent if driver else None})
    while True:
        for name in sorted(os.listdir(jobs)):
            if name.endswith('.json') and name not in seen:
                seen.add(name)
                with open(os.path.join(jobs, name)) as f:
                    job = json.load(f)
                eventlet.spawn(run_job, spool, name[:-5], job, throttle)
        time.sleep(0.2)  # green: the copies' greenthreads run meanwhile


if __name__ == '__main__':
    main()
