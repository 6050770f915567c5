#!/bin/bash
# The VM test lane: the kernel tests on pure cgroup v2 (io.max), device-mapper and
# kernel-parsed partition tables, in ONE boot of Debian's kernel under QEMU (tools/vm/).
#
#   tools/run-vm-tests.sh PYTHON [--systemd|--e2e] [PYTEST ARGS...]
#
# PYTHON is the project venv's interpreter by its own path (e.g. /tmp/venv/bin/python, not a
# pyenv shim: a shim costs ~3 s per call under TCG). PYTEST ARGS replace the default
# selection: the kernel and vm tests of the files that exercise the cgroup path (DEFAULT
# below); the CLI, pv and policy suites time windows tuned to the host, not to emulation
# (see tools/vm/README.md); then, in a second boot with systemd as PID 1, the systemd
# suite (SYSTEMD below: cinder-volume as a unit); then, in a third boot with 6 GiB and two
# vCPUs, the end-to-end suite (E2E below: Cinder's API, scheduler and two LVM volume
# services in one process, every copying flow through the REST API). --systemd or --e2e
# runs only that boot, with PYTEST ARGS if given. Runs as root; sets the lane up first
# (tools/vm/setup.sh, cached in .vm/). Exit status: pytest's (the worst of the boots); 124
# if a VM timed out (CCT_VM_TIMEOUT, default 1200 s; CCT_VM_E2E_TIMEOUT, default 2400 s,
# for the e2e boot), 125 if it died.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 1 ] || { sed -n '4,5p' "$0" | sed 's/^# *//' >&2; exit 2; }
PYTHON=$1
shift
case $PYTHON in /*) ;; *) PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") ;; esac
[ -x "$PYTHON" ] || { echo "tools/run-vm-tests.sh: $PYTHON is not an executable" >&2; exit 2; }
DEFAULT=(-m 'kernel or vm' tests/kernel/test_cgroup_copy.py tests/kernel/test_lifecycle.py
         tests/kernel/test_devices.py tests/kernel/test_vm_lane.py
         tests/kernel/test_containers.py)
SYSTEMD=(-m systemd tests/systemd)
# The e2e suite holds two volume groups' data in guest RAM (tmpfs) and runs Cinder's
# services beside the copies: 6 GiB, and a second vCPU so that the services' Python does
# not starve the copies (see doc/benchmark.md).
E2E=(-m vm --durations=0 tests/e2e)
PLAIN=1
case ${1:-} in
    --systemd)
        PLAIN= E2E=()
        shift
        [ $# -gt 0 ] || set -- "${SYSTEMD[@]}"
        ;;
    --e2e)
        PLAIN= SYSTEMD=()
        shift
        [ $# -gt 0 ] && E2E=("$@")
        set --
        ;;
    "")
        set -- "${DEFAULT[@]}"
        ;;
    *)
        SYSTEMD=() E2E=()  # own arguments: one plain boot
        ;;
esac

t0=$(date +%s)
bash "$REPO/tools/vm/setup.sh" || exit
cd "$REPO"
rc=0
if [ -n "$PLAIN" ]; then
    t1=$(date +%s)
    "$REPO/tools/vm/run.sh" --timeout "${CCT_VM_TIMEOUT:-1200}" -- "$PYTHON" -m pytest "$@"
    rc=$?
    echo "tools/run-vm-tests.sh: plain boot exit $rc; setup $((t1 - t0)) s," \
         "VM $(($(date +%s) - t1)) s" >&2
    set -- "${SYSTEMD[@]}"
fi
if [ $# -gt 0 ]; then
    t1=$(date +%s)
    "$REPO/tools/vm/run.sh" --systemd --timeout "${CCT_VM_TIMEOUT:-1200}" -- \
        "$PYTHON" -m pytest "$@"
    src=$?
    echo "tools/run-vm-tests.sh: systemd boot exit $src; VM $(($(date +%s) - t1)) s" >&2
    [ "$src" = 0 ] || [ "$rc" != 0 ] || rc=$src
fi
if [ ${#E2E[@]} -gt 0 ]; then
    t1=$(date +%s)
    "$REPO/tools/vm/run.sh" -m 6G --smp 2 --timeout "${CCT_VM_E2E_TIMEOUT:-2400}" -- \
        "$PYTHON" -m pytest "${E2E[@]}"
    erc=$?
    echo "tools/run-vm-tests.sh: e2e boot exit $erc; VM $(($(date +%s) - t1)) s" >&2
    [ "$erc" = 0 ] || [ "$rc" != 0 ] || rc=$erc
fi
exit $rc
