"""A copy budget per backend shared by many cinder-volume hosts through tooz and etcd.

Every host is a separate process (tests/budget_host.py: eventlet-patched like
cinder-volume, own state dir, own parent cgroup, own host name) copying through Cinder's
real ``copy_volume`` between scratch loop devices; etcd is Debian's etcd-server on
loopback. The oracle reads the limits and byte counters of every leaf from cgroupfs.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Dict, List, Optional

import pytest

from tests.budget_cluster import Cluster, Sampler
from tests.scratch import MiB

pytestmark = [pytest.mark.kernel, pytest.mark.cinder]

BUDGET = 16 * MiB
LOCAL = 8 * MiB  # each copy's own limit: 8 hosts could take 4x the budget without it
TTL = 5  # etcd lease 3 s (TTL - POLL - 1)
POLL = 0.5


@pytest.fixture
def make_cluster(scratch, cinder_modules):
    clusters: List[Cluster] = []

    def make(url: str, hosts: int = 8, **kw) -> Cluster:
        cluster = Cluster(scratch, url, hosts, BUDGET, LOCAL, ttl=TTL, poll=POLL, **kw)
        clusters.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in clusters:
        left = cluster.close()
        assert not left, 'cgroups left behind by hosts that ended normally: %s' % left


def fair(n: int) -> float:
    return min(LOCAL, BUDGET / n)


def all_at(share: float, n: int):
    return lambda limits: (len(limits) == n
                           and all(v is not None and abs(v - share) <= 1
                                   for v in limits.values()))


def assert_copies_ok(cluster: Cluster) -> None:
    failed = {t: e for h in cluster.hosts for t, e in h.done.items() if not e['ok']}
    assert not failed, failed


def wait_done(cluster: Cluster, tags: List[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(any(t in h.done for h in cluster.hosts) for t in tags):
        assert time.monotonic() < deadline, 'copies did not end: %s' % tags
        time.sleep(0.1)


def test_budget_shared_while_copies_come_and_go(etcd, make_cluster):
    cluster = make_cluster(etcd.url)
    with Sampler(cluster.hosts) as sampler:
        long = [h.copy(64) for h in cluster.hosts]  # 32 s at a share of 2 MiB/s
        cluster.wait_copies(8)
        assert cluster.wait_limits(all_at(fair(8), 8), 5) is not None
        t0 = time.monotonic()
        latencies = []
        for host in (0, 3, 5):  # a copy starts (9 copies), runs about 4 s, ends (8)
            time.sleep(1.5)
            cluster.hosts[host].copy(7)
            cluster.wait_copies(9)
            latencies.append(cluster.wait_limits(all_at(fair(9), 9), 2.0))
            cluster.wait_copies(8)
            latencies.append(cluster.wait_limits(all_at(fair(8), 8), 2.0))
        t1 = time.monotonic()
        time.sleep(0.5)
    assert None not in latencies, 'a re-balance took over 2 s: %s' % latencies
    # What the kernel enforced: the limits of all leaves add up to the budget, apart from
    # the moment a copy starts (its share is in force before the others' are lowered).
    span = [(t, sum(v or 0 for v in limits.values()))
            for t, limits in sampler.limits if t0 <= t <= t1]
    weighted = sum((b[0] - a[0]) * a[1] for a, b in zip(span, span[1:])) / (
        span[-1][0] - span[0][0])
    assert 0.98 <= weighted / BUDGET <= 1.02, weighted / BUDGET
    # What the copies achieved (cgroup byte counters), over the whole time copies came
    # and went, and over every 5 s of it (which other work on the machine can slow).
    total = sampler.rate(t0, t1) / BUDGET
    windows = [sampler.rate(t0 + i, t0 + i + 5.0) / BUDGET
               for i in range(int(t1 - t0 - 5.0) + 1)]
    print('limits %.3f, achieved %.3f, 5 s windows %s, re-balance latencies %s'
          % (weighted / BUDGET, total, ['%.3f' % w for w in windows],
             ['%.2f' % t for t in latencies]))
    assert 0.95 <= total <= 1.02, (total, windows)
    assert all(0.90 <= w <= 1.04 for w in windows), windows
    wait_done(cluster, long)
    assert_copies_ok(cluster)


def _unreachable_lines(cluster: Cluster) -> Dict[str, int]:
    return {h.name: h.log().count('unreachable') for h in cluster.hosts}


def test_etcd_killed_mid_copy_falls_back_then_restored(etcd, make_cluster):
    cluster = make_cluster(etcd.url)
    tags = [h.copy(48) for h in cluster.hosts]
    cluster.wait_copies(8)
    assert cluster.wait_limits(all_at(fair(8), 8), 5) is not None
    etcd.stop()
    # Every copy back at its own limit at once (a poll plus a refused connection).
    fallback = cluster.wait_limits(all_at(LOCAL, 8), 3.0)
    assert fallback is not None, 'copies did not fall back to their local limits'
    time.sleep(2 * POLL)
    assert _unreachable_lines(cluster) == {h.name: 1 for h in cluster.hosts}  # once each
    etcd.start()
    restored = cluster.wait_limits(all_at(fair(8), 8), 5.0)
    assert restored is not None, 'shares not restored within 5 s of etcd returning'
    print('local limits %.2f s after etcd was killed, shares %.2f s after its restart'
          % (fallback, restored))
    wait_done(cluster, tags)
    assert_copies_ok(cluster)


def test_etcd_down_at_start_then_started(etcd, make_cluster):
    etcd.stop()
    cluster = make_cluster(etcd.url, hosts=8)
    tags = [h.copy(40) for h in cluster.hosts]
    cluster.wait_copies(8)
    assert cluster.wait_limits(all_at(LOCAL, 8), 3.0) is not None
    etcd.start()
    restored = cluster.wait_limits(all_at(fair(8), 8), 5.0)
    assert restored is not None, 'shares not in force within 5 s of etcd starting'
    print('shares %.2f s after etcd started' % restored)
    assert _unreachable_lines(cluster) == {h.name: 1 for h in cluster.hosts}
    wait_done(cluster, tags)
    assert_copies_ok(cluster)


def test_dead_host_share_redistributed_within_lease_ttl(etcd, make_cluster):
    cluster = make_cluster(etcd.url)
    tags = [h.copy(48) for h in cluster.hosts[1:]]
    victim = cluster.hosts[0].copy(48)
    cluster.wait_copies(8)
    assert cluster.wait_limits(all_at(fair(8), 8), 5) is not None
    cluster.hosts[0].kill()  # with its copy: the machine went down
    t0 = time.monotonic()
    # Its empty leaf stays (nobody cleans up after a dead host here): look at the others.
    survivors = cluster.hosts[1:]

    def others_at(share: float):
        def check(_limits: Dict[str, Optional[int]]) -> bool:
            from tests.budget_cluster import leaf_limit
            leaves = [leaf for h in survivors for leaf in h.leaf_dirs()]
            return len(leaves) == 7 and all(
                abs((leaf_limit(leaf) or 0) - share) <= 1 for leaf in leaves)
        return check
    took = cluster.wait_limits(others_at(fair(7)), TTL + 2)
    elapsed = time.monotonic() - t0
    assert took is not None, 'the dead host\'s share was not redistributed'
    print('the dead host\'s share redistributed %.2f s after its death (lease TTL %d s)'
          % (elapsed, TTL))
    assert elapsed <= TTL, 'not within the lease TTL'
    assert victim not in cluster.hosts[0].done
    wait_done(cluster, tags)
    assert_copies_ok(cluster)


class Proxy:
    """A TCP proxy to etcd that the test can cut: the hosts behind it lose etcd while
    the others keep it (a network split)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self.conns: List[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            upstream = socket.create_connection(('127.0.0.1', self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def sever(self) -> None:
        self.cut.set()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.sever()
        self.listener.close()


def test_split_never_exceeds_budget_plus_unreachable_local_limits(etcd, make_cluster):
    cut_hosts = 3
    proxy = Proxy(etcd.client_port)
    try:
        cluster = make_cluster(
            etcd.url, urls=lambda i: ('etcd3+http://127.0.0.1:%d' % proxy.port
                                      if i < cut_hosts else etcd.url))
        tags = [h.copy(56) for h in cluster.hosts]
        cluster.wait_copies(8)
        assert cluster.wait_limits(all_at(fair(8), 8), 5) is not None
        bound = BUDGET + cut_hosts * LOCAL
        with Sampler(cluster.hosts, every=0.05) as sampler:
            proxy.sever()
            time.sleep(TTL + 3.0)
        sums = [sum(v or 0 for v in limits.values()) for _, limits in sampler.limits]
        print('split: highest sum of limits %.3f of the budget (bound %.3f)'
              % (max(sums) / BUDGET, bound / BUDGET))
        assert max(sums) <= bound + 8, max(sums)
        # After the leases of the cut hosts expired, the others share the whole budget.
        reachable = [leaf for h in cluster.hosts[cut_hosts:] for leaf in h.leaf_dirs()]
        final = sampler.limits[-1][1]
        assert all(abs(final[leaf] - BUDGET / 5) <= 1 for leaf in reachable), final
        cut = [leaf for h in cluster.hosts[:cut_hosts] for leaf in h.leaf_dirs()]
        assert all(final[leaf] == LOCAL for leaf in cut), final
        # And never before: while the cut hosts' leases live, their shares stay reserved.
        early = [limits for t, limits in sampler.limits if t - sampler.limits[0][0] < 1.5]
        assert all(sum(limits.get(leaf) or 0 for leaf in reachable) <= BUDGET * 5 / 8 + 5
                   for limits in early)
        wait_done(cluster, tags)
        assert_copies_ok(cluster)
    finally:
        proxy.close()
