#!/bin/bash
# The VM test lane: the kernel tests on pure cgroup v2 (io.max), device-mapper and
# kernel-parsed partition tables, in ONE boot of Debian's kernel under QEMU (tools/vm/).
#
#   tools/run-vm-tests.sh PYTHON [PYTEST ARGS...]
#
# PYTHON is the project venv's interpreter by its own path (e.g. /tmp/venv/bin/python, not a
# pyenv shim: a shim costs ~3 s per call under TCG). PYTEST ARGS replace the default
# selection, which is every test marked kernel or vm under tests/kernel. Runs as root; sets
# the lane up first (tools/vm/setup.sh, cached in .vm/). Exit status: pytest's; 124 if the VM
# timed out (CCT_VM_TIMEOUT, default 1200 s), 125 if it died.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 1 ] || { sed -n '4,5p' "$0" | sed 's/^# *//' >&2; exit 2; }
PYTHON=$1
shift
case $PYTHON in /*) ;; *) PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") ;; esac
[ -x "$PYTHON" ] || { echo "tools/run-vm-tests.sh: $PYTHON is not an executable" >&2; exit 2; }
[ $# -gt 0 ] || set -- -m 'kernel or vm' tests/kernel

t0=$(date +%s)
bash "$REPO/tools/vm/setup.sh" || exit
cd "$REPO"
t1=$(date +%s)
"$REPO/tools/vm/run.sh" --timeout "${CCT_VM_TIMEOUT:-1200}" -- "$PYTHON" -m pytest "$@"
rc=$?
t2=$(date +%s)
echo "tools/run-vm-tests.sh: exit $rc; setup $((t1 - t0)) s, VM $((t2 - t1)) s" >&2
exit $rc
