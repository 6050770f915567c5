#!/bin/bash
# The whole test suite, as root on a fresh machine: set-up, then the host lane (the real
# kernel here: cgroup v1 blkio, loop devices, real Cinder), then the VM lane (pure cgroup v2,
# device-mapper, kernel-parsed partition tables, in a qemu VM with Debian's kernel; then a
# second boot with systemd as PID 1 for tests/systemd; then a third for tests/e2e, every
# copying flow through Cinder's API on LVM). Extra arguments go to pytest in both lanes (the
# VM lane then boots once, plain).
set -uo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh || exit 1
export PATH="$PWD/.venv/bin:$PATH"

echo "=== host lane: $(uname -r), $(.venv/bin/python -c 'from cinder_cgroup_throttle.cgroups import detect; print(detect().layout)') cgroups"
.venv/bin/python -m pytest -m "not vm" "$@" tests
host=$?

echo "=== VM lane: pure cgroup v2 (plain, then systemd as PID 1, then Cinder end to end on LVM)"
tools/run-vm-tests.sh "$PWD/.venv/bin/python" "$@"
vm=$?

echo "=== host lane exit $host, VM lane exit $vm"
[ "$host" = 0 ] && [ "$vm" = 0 ]
