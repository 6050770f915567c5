"""Simulated cinder-volume hosts sharing one copy budget, and an oracle on cgroupfs.

Each host is a separate process (tests/budget_host.py) with its own state directory, its
own parent cgroup and its own host name, copying through Cinder's ``copy_volume`` between
scratch loop devices. The oracle reads the kernel's files of every host's leaves directly
(limits in force, bytes written) and never imports the code under test.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from tests.scratch import Scratch, leaf_bytes, leaf_write_limits, sampling_on_time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V1 = '/sys/fs/cgroup/blkio'
V2 = '/sys/fs/cgroup'


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # the leaf went away with its copy
        return ''


class Host:
    def __init__(self, cluster: 'Cluster', index: int, url: str) -> None:
        self.cluster = cluster
        self.name = 'host%02d' % index
        self.cgroup = 'cct-bud-%d-%d' % (os.getpid(), index)
        self.state_dir = os.path.join(cluster.scratch.dir, 'state-%s' % self.name)
        self.log_path = os.path.join(cluster.scratch.dir, '%s.log' % self.name)
        self.events: 'queue.Queue[dict]' = queue.Queue()
        self.done: Dict[str, dict] = {}
        self.url = url
        self.src = cluster.shared_src or cluster.scratch.loop(cluster.loop_mib)
        self.free_dsts: List[str] = []
        self.busy: Dict[str, str] = {}
        self.proc: Optional[subprocess.Popen] = None
        self.killed = False

    def start(self) -> None:
        c = self.cluster
        argv = [sys.executable, '-m', 'tests.budget_host', '--host', self.name,
                '--cgroup', self.cgroup, '--state-dir', self.state_dir, '--url', self.url,
                '--group', c.group, '--budget', str(c.budget),
                '--copy-limit', str(c.copy_limit), '--ttl', str(c.ttl),
                '--poll', str(c.poll)]
        with open(self.log_path, 'ab') as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True,
                                         start_new_session=True)
        threading.Thread(target=self._read_events, daemon=True).start()

    def _read_events(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            if event.get('event') == 'done':
                self.done[event['tag']] = event
                dst = self.busy.pop(event['tag'], None)
                if dst:
                    self.free_dsts.append(dst)
            self.events.put(event)

    def wait_ready(self, timeout: float = 120) -> None:
        event = self.events.get(timeout=timeout)
        assert event['event'] == 'ready', event

    def copy(self, mib: int) -> str:
        tag = '%s-%d' % (self.name, self.cluster.next_tag())
        dst = self.free_dsts.pop() if self.free_dsts else self.cluster.scratch.loop(
            self.cluster.loop_mib)
        self.busy[tag] = dst
        self._send({'op': 'copy', 'tag': tag, 'src': self.src, 'dst': dst, 'mib': mib})
        return tag

    def _send(self, cmd: dict) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + '\n')
        self.proc.stdin.flush()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """The host dies with its copies (a machine that goes down)."""
        if self.alive:
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.killed = True

    def quit(self, timeout: float = 120) -> None:
        if self.alive:
            assert self.proc is not None
            self._send({'op': 'quit'})
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return _read(self.log_path)

    # -- oracle ----------------------------------------------------------------------
    def leaf_dirs(self) -> List[str]:
        for base in (V1, V2):
            parent = os.path.join(base, self.cgroup)
            if os.path.isdir(parent):
                return [os.path.join(parent, n) for n in sorted(os.listdir(parent))
                        if n.startswith('copy-')
                        and os.path.isdir(os.path.join(parent, n))]
        return []

    def remove_cgroups(self) -> List[str]:
        """rmdir what the host left (killed hosts leave empty leaves); returns the leaves
        that had to be removed."""
        left = self.leaf_dirs()
        for leaf in left:
            for _ in range(50):
                try:
                    os.rmdir(leaf)
                    break
                except OSError:
                    time.sleep(0.1)
        for base in (V1, V2):
            try:
                os.rmdir(os.path.join(base, self.cgroup))
            except OSError:
                pass
        return left


def leaf_limit(leaf: str) -> Optional[int]:
    """The write limit in force on a leaf (bytes/s), None when it has none."""
    limits = leaf_write_limits(leaf) or {}
    return next(iter(limits.values()), None)


def leaf_written(leaf: str) -> int:
    return (leaf_bytes(leaf) or (0, 0))[1]


class Sampler:
    """Bytes written by every leaf of every host, sampled every ``every`` seconds;
    a leaf's bytes count from its first sample (its start is at most ``every`` late)."""

    def __init__(self, hosts: List[Host], every: float = 0.1) -> None:
        self.hosts = hosts
        self.every = every
        self.series: List[Tuple[float, int]] = []  # (monotonic time, cumulative bytes)
        self.limits: List[Tuple[float, Dict[str, Optional[int]]]] = []
        self._last: Dict[str, int] = {}
        self._total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> 'Sampler':
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with sampling_on_time():
            while not self._stop.is_set():
                now = time.monotonic()
                limits: Dict[str, Optional[int]] = {}
                for host in self.hosts:
                    for leaf in host.leaf_dirs():
                        written = leaf_written(leaf)
                        if leaf in self._last:
                            self._total += max(0, written - self._last[leaf])
                        self._last[leaf] = written
                        limits[leaf] = leaf_limit(leaf)
                self.series.append((now, self._total))
                self.limits.append((now, limits))
                self._stop.wait(self.every)

    def rate(self, t0: float, t1: float) -> float:
        """Bytes/s of all copies together between two monotonic times."""
        def at(t: float) -> Tuple[float, int]:
            return min(self.series, key=lambda s: abs(s[0] - t))
        (a, ba), (b, bb) = at(t0), at(t1)
        return (bb - ba) / (b - a)


class Cluster:
    def __init__(self, scratch: Scratch, url: str, hosts: int, budget: int,
                 copy_limit: int, ttl: int = 5, poll: float = 0.5, loop_mib: int = 64,
                 urls: Optional[Callable[[int], str]] = None,
                 shared_src: bool = False) -> None:
        self.scratch = scratch
        self.group = 'cct-%d-%s' % (os.getpid(), os.urandom(3).hex())
        self.budget = budget
        self.copy_limit = copy_limit
        self.ttl = ttl
        self.poll = poll
        self.loop_mib = loop_mib
        self._tags = 0
        # One source device read by every host's copies (fewer loop devices for many hosts)
        self.shared_src = scratch.loop(loop_mib) if shared_src else None
        self.hosts = [Host(self, i, urls(i) if urls else url) for i in range(hosts)]

    def next_tag(self) -> int:
        self._tags += 1
        return self._tags

    def start(self) -> None:
        for host in self.hosts:
            host.start()
        for host in self.hosts:
            host.wait_ready()

    def close(self, abort: bool = False) -> List[str]:
        """Stop every host (``abort``: kill it with its copies) and remove its cgroups;
        returns the leaves that hosts which were not killed left behind."""
        for host in self.hosts:
            host.kill() if abort else host.quit()
        left = []
        for host in self.hosts:
            killed = host.killed
            host.kill()
            removed = host.remove_cgroups()
            if not killed:
                left += removed
        return left

    def leaves(self) -> List[str]:
        return [leaf for host in self.hosts for leaf in host.leaf_dirs()]

    def wait_limits(self, want: Callable[[Dict[str, Optional[int]]], bool],
                    timeout: float) -> Optional[float]:
        """Seconds until ``want(limits of all leaves)`` holds, None if it did not."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            limits = {leaf: leaf_limit(leaf) for leaf in self.leaves()}
            if limits and want(limits):
                return time.monotonic() - t0
            time.sleep(0.05)
        return None

    def wait_copies(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.leaves()) != n:
            if time.monotonic() > deadline:
                raise AssertionError('expected %d copies, cgroupfs has %d'
                                     % (n, len(self.leaves())))
            time.sleep(0.05)
