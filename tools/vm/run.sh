#!/bin/bash
# Run one command as root in a throw-away QEMU VM on Debian's kernel with pure cgroup v2.
#
#   tools/vm/run.sh [-m MEM] [--smp N] [--timeout SEC] [--env K=V]... [--systemd] [--] CMD [ARGS...]
#
# --systemd boots the host's systemd as PID 1 (about 6-9 s more) and runs CMD as the oneshot
# unit cct-lane.service, in /system.slice/cct-lane.service (not delegated), with systemctl,
# systemd-run and unit files under /etc/systemd/system working as on a real host.
# The guest sees the host's / read-only under a tmpfs overlay (see guest-init.sh), so CMD is
# the host's own program with the host's files; its writes are discarded with the VM. CMD
# runs in the caller's cwd with stdin /dev/null and this environment only: PATH, HOME, LANG,
# LC_ALL, TERM, TZ, CI, CCT_*, PYTEST_*, the --env pairs, and CCT_VM=1 (how tests know they
# are in the lane). Its stdout and stderr stream back separately. Run tools/vm/setup.sh first.
#
# Exit status: CMD's; 124 when --timeout (default 1500 s) expired; 125 when the VM ended
# without CMD's status (boot failure, panic, qemu error): the guest console tail is printed.
# Accelerator: TCG. KVM is not used: on the nested-PVM hosts this project runs on it cannot
# boot a stock kernel (see tools/vm/README.md).
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
VM_DIR=${CCT_VM_DIR:-$(cd "$HERE/../.." && pwd)/.vm}
MEM=3G SMP=1 TIMEOUT=1500 MODE=plain
ENVS=()
usage() { sed -n '4p' "$0" | sed 's/^# *//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
        -m) MEM=$2; shift 2 ;;
        --smp) SMP=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --env) [[ $2 == [A-Za-z_]*=* ]] || usage; ENVS+=("$2"); shift 2 ;;
        --systemd) MODE=systemd; shift ;;
        --) shift; break ;;
        -*) usage ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || usage
die() { echo "tools/vm/run.sh: $*" >&2; exit 125; }
[ "$(id -u)" = 0 ] || die "must run as root (the host's / is shared with the guest as root)"
for f in vmlinux initramfs.cpio.gz; do
    [ -s "$VM_DIR/$f" ] || die "$VM_DIR/$f is missing: run tools/vm/setup.sh"
done
case $VM_DIR in *[[:space:],]*) die "VM dir path must not contain spaces or commas" ;; esac

mkdir -p "$VM_DIR/runs"
TMP=$(mktemp -d "$VM_DIR/runs/run.XXXXXX") || die "cannot create a run dir in $VM_DIR/runs"
RUN=$TMP/share   # shared read-write with the guest, at the same path there
mkdir "$RUN"
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

{
    echo 'set -e'
    for name in $(compgen -e); do
        case $name in
            PATH|HOME|LANG|LC_ALL|TERM|TZ|CI|CCT_*|PYTEST_*)
                printf 'export %s=%q\n' "$name" "${!name}" ;;
        esac
    done
    for kv in "${ENVS[@]}"; do printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"; done
    echo 'export CCT_VM=1'
    echo "export CCT_VM_MODE=$MODE"
    printf 'cd %q\n' "$PWD"
    echo 'set +e'
    printf 'exec'; printf ' %q' "$@"; echo
} > "$RUN/cmd.sh"

# Output: each virtio serial port writes into a FIFO that a cat here copies to our stdout
# or stderr as it arrives (a file chardev on /dev/stdout would truncate a redirected log).
mkfifo "$TMP/out" "$TMP/err"
cat "$TMP/out" & PIDS+=($!)
cat "$TMP/err" >&2 & PIDS+=($!)

KCMD="console=ttyS0 quiet loglevel=4 panic=-1 cgroup_no_v1=all cct.run=$RUN cct.vm_dir=$VM_DIR"
KCMD="$KCMD cct.mode=$MODE"
[ "$MODE" = plain ] || KCMD="$KCMD systemd.unified_cgroup_hierarchy=1 systemd.show_status=0"
timeout -s TERM -k 10 "$TIMEOUT" qemu-system-x86_64 -name cct-vm \
    -machine pc -accel tcg,thread=multi -cpu max -m "$MEM" -smp "$SMP" \
    -nodefaults -no-user-config -display none -no-reboot \
    -kernel "$VM_DIR/vmlinux" -initrd "$VM_DIR/initramfs.cpio.gz" \
    -append "$KCMD" \
    -serial "file:$TMP/console.log" \
    -device virtio-rng-pci \
    -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
    -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
    -fsdev "local,id=run,path=$RUN,security_model=passthrough" \
    -device virtio-9p-pci,fsdev=run,mount_tag=run \
    -device virtio-serial-pci \
    -chardev "file,id=out,path=$TMP/out" -device virtserialport,chardev=out,name=cct.stdout \
    -chardev "file,id=err,path=$TMP/err" -device virtserialport,chardev=err,name=cct.stderr \
    </dev/null >"$TMP/qemu.log" 2>&1 &
QEMU=$!
PIDS+=($QEMU)
wait $QEMU
qrc=$?
# A cat whose FIFO qemu never opened (qemu failed early) blocks in open(2): an O_RDWR open
# never blocks and, closed again, gives it EOF. The others end when qemu closes its side.
for i in 0 1; do
    fifo=$TMP/$([ $i = 0 ] && echo out || echo err)
    if kill -0 "${PIDS[$i]}" 2>/dev/null; then exec {fd}<>"$fifo"; exec {fd}>&-; fi
done
wait "${PIDS[0]}" "${PIDS[1]}" 2>/dev/null
PIDS=()

# timeout(1) exits 124, or 137 when qemu needed the SIGKILL of -k; a 137 before the time
# was up is a qemu killed by someone else: the VM died.
if [ "$qrc" = 124 ] || { [ "$qrc" = 137 ] && [ "$SECONDS" -ge "$TIMEOUT" ]; }; then
    echo "tools/vm/run.sh: timed out after ${TIMEOUT}s; guest console tail:" >&2
    tail -n 20 "$TMP/console.log" >&2
    exit 124
fi
if [ ! -s "$RUN/rc" ]; then
    echo "tools/vm/run.sh: the VM ended without the command's exit status (qemu exit $qrc)" >&2
    cat "$TMP/qemu.log" "$RUN/init-error" 2>/dev/null >&2
    echo "--- guest console tail ---" >&2
    tail -n 30 "$TMP/console.log" >&2
    exit 125
fi
exit "$(cat "$RUN/rc")"
