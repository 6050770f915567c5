"""A private etcd (Debian's etcd-server) on loopback for tests and the benchmark.

Random free ports, data in a temporary directory; ``stop``/``start`` keep the data, as an
etcd that goes away and comes back does.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from typing import Dict, Optional

ETCD = '/usr/bin/etcd'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Etcd:
    def __init__(self) -> None:
        if not os.access(ETCD, os.X_OK):
            raise RuntimeError('%s is missing: apt-get install etcd-server '
                               '(tools/bootstrap.sh installs it)' % ETCD)
        self.dir = tempfile.mkdtemp(prefix='cct-etcd-')
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.log = open(os.path.join(self.dir, 'etcd.log'), 'ab')

    @property
    def client_url(self) -> str:
        return 'http://127.0.0.1:%d' % self.client_port

    @property
    def url(self) -> str:
        """tooz URL."""
        return 'etcd3+http://127.0.0.1:%d' % self.client_port

    def start(self, timeout: float = 20.0) -> None:
        peer = 'http://127.0.0.1:%d' % self.peer_port
        argv = [ETCD, '--name', 'cct', '--data-dir', os.path.join(self.dir, 'data'),
                '--listen-client-urls', self.client_url,
                '--advertise-client-urls', self.client_url,
                '--listen-peer-urls', peer, '--initial-advertise-peer-urls', peer,
                '--initial-cluster', 'cct=' + peer, '--log-outputs', 'stderr']
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=self.log,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError('etcd exited %s; log in %s'
                                   % (self.proc.returncode, self.dir))
            if self.healthy():
                return
            time.sleep(0.1)
        raise RuntimeError('etcd did not become healthy in %.0f s' % timeout)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.client_url + '/health', timeout=1) as r:
                return json.load(r).get('health') == 'true'
        except (OSError, ValueError):
            return False

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
        self.proc = None

    def close(self) -> None:
        self.stop()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def requests_total(self) -> float:
        """Requests etcd's gRPC server handled (the HTTP gateway forwards every request
        of etcd3gw to it), from its /metrics endpoint."""
        return sum(self.metrics('grpc_server_handled_total').values())

    def metrics(self, name: str) -> Dict[str, float]:
        with urllib.request.urlopen(self.client_url + '/metrics', timeout=5) as r:
            text = r.read().decode()
        found = {}
        for line in text.splitlines():
            if line.startswith(name + '{') or line.startswith(name + ' '):
                key, _, value = line.rpartition(' ')
                found[key] = float(value)
        return found
