"""Benchmark phase: a copy budget shared by N simulated hosts through etcd.

For N hosts (separate processes, tests/budget_host.py, each with one long copy through
Cinder's ``copy_volume``), a copy starts on one host again and again; the re-balance
latency is the time from its leaf appearing in cgroupfs until the write limit of every
leaf of every host is the new fair share (and likewise when it ends). etcd's load is the
change of its ``grpc_server_handled_total`` counters (every etcd3gw request goes through
the gateway to one gRPC call) over a steady period, per second and per active copy.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List

from copyrun import MiB

from tests.budget_cluster import Cluster, Sampler
from tests.etcd import Etcd
from tests.scratch import Scratch

Row = Dict[str, Any]
BUDGET = 8 * MiB
LOCAL = 8 * MiB


def pct(values: List[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))]


def _at(share: float, n: int):
    return lambda limits: len(limits) == n and all(
        v is not None and abs(v - share) <= 1 for v in limits.values())


def one(hosts: int, starts: int, scratch: Scratch, log: Any) -> Row:
    etcd = Etcd()
    etcd.start()
    share = BUDGET / hosts
    long_mib = int(share * (starts * 6 + 40) / MiB) + 1  # outlives the measurements
    cluster = Cluster(scratch, etcd.url, hosts, BUDGET, LOCAL, ttl=10, poll=0.5,
                      loop_mib=long_mib + 4, shared_src=True)
    try:
        t0 = time.monotonic()
        cluster.start()
        log('budget: %d hosts up in %.1f s' % (hosts, time.monotonic() - t0))
        for host in cluster.hosts:
            host.copy(long_mib)
        cluster.wait_copies(hosts, timeout=60)
        if cluster.wait_limits(_at(min(LOCAL, share), hosts), 30) is None:
            raise RuntimeError('shares did not settle')
        # etcd load with every host running one copy
        r0, w0 = etcd.requests_total(), time.monotonic()
        with Sampler(cluster.hosts, every=0.25) as sampler:
            time.sleep(10)
        per_s = (etcd.requests_total() - r0) / (time.monotonic() - w0)
        achieved = sampler.rate(sampler.series[0][0], sampler.series[-1][0]) / BUDGET
        up, down = [], []
        for i in range(starts):
            host = cluster.hosts[i % hosts]
            host.copy(int(BUDGET / (hosts + 1) * 3 / MiB) + 1)  # about 3 s
            t = time.monotonic()
            cluster.wait_copies(hosts + 1, timeout=30)
            started = time.monotonic()
            took = cluster.wait_limits(_at(min(LOCAL, BUDGET / (hosts + 1)), hosts + 1), 10)
            up.append(float('inf') if took is None else took)
            log('budget: %d hosts, start %d: leaf after %.2f s, shares after %.2f s'
                % (hosts, i, started - t, up[-1]))
            cluster.wait_copies(hosts, timeout=60)
            took = cluster.wait_limits(_at(min(LOCAL, share), hosts), 10)
            down.append(float('inf') if took is None else took)
        failed = [e for h in cluster.hosts for e in h.done.values() if not e['ok']]
        return {'case': 'copy budget, %d hosts' % hosts, 'throttle': 'ours', 'ratio': None,
                'hosts': hosts, 'budget_bps': BUDGET, 'starts': starts,
                'rebalance_start_s': up, 'rebalance_end_s': down,
                'rebalance_start_median_s': statistics.median(up),
                'rebalance_start_p99_s': pct(up, 99),
                'rebalance_end_median_s': statistics.median(down),
                'rebalance_end_p99_s': pct(down, 99),
                'etcd_requests_per_s': per_s, 'etcd_requests_per_s_per_copy': per_s / hosts,
                'achieved_over_budget_steady': achieved, 'failed_copies': failed,
                'summary': 're-balance after a start: median %.2f s, p99 %.2f s; after an '
                           'end: median %.2f s, p99 %.2f s (%d each); etcd %.1f req/s = %.2f '
                           'per active copy; steady sum %.3f of the budget'
                           % (statistics.median(up), pct(up, 99), statistics.median(down),
                              pct(down, 99), starts, per_s, per_s / hosts, achieved)}
    finally:
        cluster.close(abort=True)  # the long copies have served their purpose
        etcd.close()


def phase(cfg: Any, scratch: Scratch, con: Any) -> List[Row]:
    from cases import log
    sizes = (8,) if cfg.quick else (8, 32)
    return [one(n, 5 if cfg.quick else 20, scratch, log) for n in sizes]
