#!/bin/sh
# /init of the VM lane's initramfs (busybox sh, PID 1 in the guest).
#
# Builds the guest's root from the host's own: the host's / over 9p (read-only) under a tmpfs
# overlay, so the host's Python, venv, repo and tools run unchanged and every write is thrown
# away with the VM. The guest gets its own proc, sysfs, devtmpfs, /dev/shm, /run and a pure
# cgroup v2 hierarchy at /sys/fs/cgroup (the kernel boots with cgroup_no_v1=all). The
# command from run.sh (<run dir>/cmd.sh) then runs chrooted as root, stdout and stderr on two
# virtio serial ports, its exit status written to <run dir>/rc; then the VM powers off.
# The command runs in its own cgroup /cct-lane, as a service on a real v2 host does (the
# root cgroup is exempt from v2's no-internal-process rule and would hide its errors).
# With cct.mode=systemd (run.sh --systemd) /init instead hands PID 1 to the host's systemd
# (switch_root), which runs the command as the oneshot unit cct-lane.service (in
# /system.slice/cct-lane.service, not delegated: like an operator's shell, the command
# starts services rather than owning cgroups) and powers off when it ends.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

RUN= VM_DIR= MODE=plain
for word in $(cat /proc/cmdline); do
    case $word in
        cct.mode=*) MODE=${word#*=} ;;
        cct.run=*) RUN=${word#*=} ;;
        cct.vm_dir=*) VM_DIR=${word#*=} ;;
    esac
done
KVER=$(uname -r)
R=/root

fail() {
    echo "guest-init: FATAL: $*"
    [ -d "$R$RUN" ] && echo "guest-init: $*" > "$R$RUN/init-error"
    sync
    poweroff -f
}

for m in $(cat /modules); do
    modprobe "$m" || fail "modprobe $m"
done

P9=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o "$P9,ro,cache=loose" hostroot /lower || fail "mount the host's / (9p)"
mount -t tmpfs -o mode=755 tmpfs /rw || fail "tmpfs for the overlay"
mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay $R ||
    fail "overlay root"
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t cgroup2 -o nsdelegate cgroup2 $R/sys/fs/cgroup || fail "mount cgroup2"
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=755 tmpfs $R/run

# The kernel runs modprobe (busybox, here in the initramfs) for modules on demand: ext4,
# btrfs, ... The full tree of the guest kernel is in the host's unpacked package.
if [ -n "$VM_DIR" ] && [ -d "$R$VM_DIR/kernel/lib/modules/$KVER" ]; then
    mount --bind "$R$VM_DIR/kernel/lib/modules/$KVER" "/lib/modules/$KVER" ||
        fail "bind the module tree"
fi

[ -n "$RUN" ] || fail "no cct.run= on the kernel command line"
mkdir -p "$R$RUN"
mount -t 9p -o "$P9" run "$R$RUN" || fail "mount the run dir (9p)"

hostname cct-vm
ip link set lo up

OUT=/dev/null ERR=/dev/null
for port in /sys/class/virtio-ports/*; do
    case $(cat "$port/name" 2>/dev/null) in
        cct.stdout) OUT=/dev/${port##*/} ;;
        cct.stderr) ERR=/dev/${port##*/} ;;
    esac
done
[ "$OUT" != /dev/null ] && [ "$ERR" != /dev/null ] || fail "virtio serial ports not found"

# The command, its output on the virtio ports and its exit status in <run dir>/rc.
cat > $R/run/cct-lane.sh <<EOF
#!/bin/sh
/bin/bash "$RUN/cmd.sh" </dev/null >"$OUT" 2>"$ERR"
echo \$? > "$RUN/rc"
sync
EOF
chmod 755 $R/run/cct-lane.sh

case $MODE in
plain)
    mkdir $R/sys/fs/cgroup/cct-lane || fail "mkdir /sys/fs/cgroup/cct-lane"
    env -i chroot $R /bin/sh -c 'echo $$ > /sys/fs/cgroup/cct-lane/cgroup.procs &&
        exec /run/cct-lane.sh'
    sync
    poweroff -f
    ;;
systemd)
    U=$R/etc/systemd/system
    mkdir -p "$U"
    cat > "$U/cct-lane.target" <<EOF
[Unit]
Description=VM lane command
Requires=cct-lane.service
Wants=basic.target
After=cct-lane.service
AllowIsolate=yes
EOF
    cat > "$U/cct-lane.service" <<EOF
[Unit]
Description=VM lane command
After=basic.target
SuccessAction=poweroff-force
FailureAction=poweroff-force
[Service]
Type=oneshot
ExecStart=/run/cct-lane.sh
StandardInput=null
StandardOutput=journal+console
TimeoutStartSec=infinity
EOF
    # Units that have no business here. systemd-tmpfiles-setup must stay masked: Debian's
    # tmp.conf ("D /tmp") would empty /tmp, i.e. hide the host's /tmp behind overlay
    # whiteouts (the host's files are untouched) and walk it over 9p for minutes.
    for u in systemd-tmpfiles-setup.service systemd-tmpfiles-clean.timer \
             systemd-tmpfiles-clean.service getty@tty1.service serial-getty@ttyS0.service \
             systemd-timesyncd.service postgresql.service e2scrub_reap.service \
             systemd-pstore.service systemd-remount-fs.service apt-daily.timer \
             apt-daily-upgrade.timer cron.service ssh.service; do
        ln -sf /dev/null "$U/$u"
    done
    # After switch_root the kernel runs the new root's /sbin/modprobe: the host has no kmod,
    # so busybox (a lane package) stands in, reading the guest's module tree.
    [ -e $R/sbin/modprobe ] || ln -s /bin/busybox $R/sbin/modprobe
    if [ -n "$VM_DIR" ] && [ -d "$R$VM_DIR/kernel/lib/modules/$KVER" ]; then
        mkdir -p "$R/lib/modules/$KVER"
        mount --bind "$R$VM_DIR/kernel/lib/modules/$KVER" "$R/lib/modules/$KVER"
    fi
    exec switch_root $R /lib/systemd/systemd systemd.unit=cct-lane.target
    ;;
*)
    fail "unknown cct.mode=$MODE"
    ;;
esac
