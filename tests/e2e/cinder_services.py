"""Cinder's API, scheduler and two volume services in one process (the VM lane's e2e tests).

    python -m tests.e2e.cinder_services CINDER_CONF

The same services cinder-api, cinder-scheduler and cinder-volume build, over a sqlite
database (migrated here with Cinder's own db_sync) and oslo.messaging's in-process
``fake://`` transport, so they must share one process. Runs as root: privsep runs in
process, processutils runs commands directly. Stops on SIGTERM.

One process, several services: Cinder 29 keeps the service id its heartbeat updates in a
class attribute (``Service.service_id``), so only the last service created reports; the
configuration must keep the others "up" (a long ``service_down_time``).
"""
from cinder import monkey_patch  # isort: skip
monkey_patch.patch()  # noqa: E402  (first, as cinder's own commands do)

import sys  # noqa: E402

from oslo_config import cfg  # noqa: E402
from oslo_log import log as logging  # noqa: E402
from oslo_service import service as oslo_service  # noqa: E402

from cinder import objects  # noqa: E402
objects.register_all()  # before the managers, whose imports need the objects

import os_brick  # noqa: E402
import os_brick.privileged  # noqa: E402

import cinder.privsep  # noqa: E402
from cinder import coordination, rpc, service, version  # noqa: E402
from cinder.common import config  # noqa: E402
from cinder.common import constants  # noqa: E402
from cinder.db import migration  # noqa: E402


def main(conf_path: str) -> None:
    conf = cfg.CONF
    conf([], project='cinder', version=version.version_string(),
         default_config_files=[conf_path])
    config.set_middleware_defaults()
    logging.setup(conf, 'cinder')
    cinder.privsep.sys_admin_pctxt.set_client_mode(False)
    os_brick.privileged.default.set_client_mode(False)
    os_brick.setup(conf)
    migration.db_sync()
    coordination.COORDINATOR.start()
    rpc.init(conf)
    launcher = oslo_service.ServiceLauncher(conf, restart_method='mutate')
    launcher.launch_service(service.Service.create(binary=constants.SCHEDULER_BINARY))
    for backend in conf.enabled_backends:
        launcher.launch_service(service.Service.create(
            host='%s@%s' % (conf.host, backend), service_name=backend,
            binary=constants.VOLUME_BINARY, coordination=True))
    launcher.launch_service(service.WSGIService('osapi_volume'))
    print('cinder services started', flush=True)
    launcher.wait()


if __name__ == '__main__':
    main(sys.argv[1])
