#!/bin/bash
# Install everything the demo and the test suite need on a fresh Debian machine (as root):
# Debian packages, then a Python venv in .venv with this package, its requirements and
# cinder==29.0.0 (the client the functional tests drive). Idempotent and quick on re-runs.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="cgroup-tools pv fdisk util-linux e2fsprogs btrfs-progs qemu-utils sudo procps etcd-server"
if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: run as root (cgroups and loop devices need it)" >&2
    exit 1
fi
missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "bootstrap: apt-get install$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

PY=${PYTHON:-python3}
stamp=$(cat requirements.txt test-requirements.txt setup.cfg | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.stamp 2>/dev/null)" != "$stamp" ]; then
    echo "bootstrap: creating .venv (cinder==29.0.0 takes about a minute)"
    "$PY" -m venv .venv
    pip() { .venv/bin/pip install -q --disable-pip-version-check "$@" 2>&1 |
            { grep -v '^WARNING: Location' || true; }; return "${PIPESTATUS[0]}"; }
    pip -r requirements.txt -r test-requirements.txt 'cinder==29.0.0'
    pip -e .
    .venv/bin/python -W ignore -c 'import cinder, cinder_cgroup_throttle, oslo_rootwrap' 
    echo "$stamp" > .venv/.stamp
fi
