"""One simulated cinder-volume host for the copy-budget tests and benchmark.

Run as ``python -m tests.budget_host --host NAME --cgroup PARENT --state-dir DIR --url URL
--budget BPS [...]``: like cinder-volume it monkey-patches with eventlet first, then installs
our throttle (own CopyManager: own state dir, own parent cgroup, its budget shared through
etcd) as Cinder's default and copies through Cinder's real ``volume_utils.copy_volume``.

stdin takes one JSON object per line: ``{"op": "copy", "tag": T, "src": S, "dst": D,
"mib": N}`` starts a copy in a green thread, ``{"op": "quit"}`` leaves the budget and
exits once the copies ended. stdout gets one JSON line per event: ``ready``, ``done``
(``ok``, ``error``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ('--host', '--cgroup', '--state-dir', '--url', '--group'):
        parser.add_argument(name, required=True)
    parser.add_argument('--budget', type=int, required=True)
    parser.add_argument('--copy-limit', type=int, required=True, help='own limit per copy')
    parser.add_argument('--host-limit', type=int, default=0)
    parser.add_argument('--ttl', type=int, default=5)
    parser.add_argument('--poll', type=float, default=0.5)
    parser.add_argument('--bs', default='64K')
    parser.add_argument('--no-eventlet', action='store_true')
    args = parser.parse_args()
    if not args.no_eventlet:
        from cinder import monkey_patch
        monkey_patch.patch()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format='%(asctime)s ' + args.host + ' %(levelname)s %(name)s: '
                        '%(message)s')
    import threading

    import cinder.privsep
    from cinder.volume import throttling, volume_utils

    from cinder_cgroup_throttle.budget import BudgetConfig
    from cinder_cgroup_throttle.manager import CopyManager
    from cinder_cgroup_throttle.registry import Registry
    from cinder_cgroup_throttle.throttle import CgroupThrottle

    cinder.privsep.sys_admin_pctxt.set_client_mode(False)  # root, in-process
    manager = CopyManager(args.cgroup, grace=5, backend='cgroup',
                          registry=Registry(args.state_dir), host_bps_limit=args.host_limit,
                          budget_config=BudgetConfig(
                              url=args.url, group=args.group, bps_limit=args.budget,
                              host=args.host, lease_ttl=args.ttl,
                              poll_interval=args.poll))
    throttle = CgroupThrottle(args.copy_limit, manager=manager)
    throttling.Throttle.set_default(throttle)
    out_lock = threading.Lock()

    def say(**event: object) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(event) + '\n')
            sys.stdout.flush()

    def copy(tag: str, src: str, dst: str, mib: int) -> None:
        try:
            volume_utils.copy_volume(src, dst, mib, args.bs)
            say(event='done', tag=tag, ok=True)
        except Exception as exc:
            say(event='done', tag=tag, ok=False, error='%s: %s' % (type(exc).__name__, exc))

    def readline() -> str:
        if args.no_eventlet:
            return sys.stdin.readline()
        from eventlet import tpool
        return tpool.execute(sys.stdin.readline)  # a blocking read off the hub

    copies = []
    say(event='ready')
    while True:
        line = readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd['op'] == 'quit':
            break
        if cmd['op'] == 'copy':
            t = threading.Thread(target=copy, args=(cmd['tag'], cmd['src'], cmd['dst'],
                                                    cmd['mib']))
            t.start()
            copies.append(t)
    for t in copies:
        t.join()
    manager.close()
    say(event='bye')
    return 0


if __name__ == '__main__':
    sys.exit(main())
