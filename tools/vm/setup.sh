#!/bin/bash
# Prepare the VM test lane: Debian's own kernel booted under QEMU with pure cgroup v2.
#
# Idempotent and cached in $CCT_VM_DIR (default: <repo>/.vm, git-ignored); a second run
# that finds everything in place only checks and returns. As root:
#   * apt: qemu-system-x86 busybox-static xz-utils dmsetup systemd (--systemd mode boots the
#     host's systemd) lvm2 (the e2e suite's volume groups), only the missing ones;
#   * `apt-get download` of the kernel package linux-image-amd64 depends on, unpacked into
#     .vm/kernel (never installed: the host keeps its own kernel and /lib/modules);
#   * .vm/vmlinux: the uncompressed ELF inside vmlinuz; QEMU boots it through its PVH entry,
#     which saves the ~3.5 s the in-guest xz decompression costs under TCG;
#   * .vm/initramfs.cpio.gz: busybox-static, guest-init.sh as /init, and the modules /init
#     needs before the host's root is reachable (Debian builds virtio, 9p, overlay, loop and
#     dm-mod as modules), and dm-snapshot: LVM snapshots (Cinder's LVM clones) need it, and
#     LVM cannot load it on demand (it runs the host's modprobe, and the host has no kmod).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VM_DIR=${CCT_VM_DIR:-$REPO/.vm}
PACKAGES="qemu-system-x86 busybox-static xz-utils dmsetup systemd lvm2"
# Loaded by /init, in this order; their dependencies come from modules.dep.
MODULES="virtio_pci virtio_console virtio-rng 9pnet_virtio 9p overlay loop dm-mod dm-snapshot"

die() { echo "tools/vm/setup.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

apt_updated=
apt_update() { [ -n "$apt_updated" ] || apt-get update -qq; apt_updated=1; }

missing=
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
        missing="$missing $p"
done
if [ -n "$missing" ]; then
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing \
        >/dev/null || die "apt-get install$missing failed"
fi

kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
KPKG=$(kernel_package)
[ -n "$KPKG" ] || { apt_update; KPKG=$(kernel_package); }
[ -n "$KPKG" ] || die "cannot tell which kernel linux-image-amd64 depends on (apt-cache depends)"
KVER=${KPKG#linux-image-}

mkdir -p "$VM_DIR/debs"
cd "$VM_DIR"

# -- kernel: download and unpack once per kernel version
if [ "$(cat KVER 2>/dev/null)" != "$KVER" ] || [ ! -f "kernel/boot/vmlinuz-$KVER" ]; then
    rm -rf kernel vmlinux initramfs.cpio.gz KVER
    if ! ls debs/"${KPKG}"_*.deb >/dev/null 2>&1; then
        # A stale package list names a version the mirror no longer has: update and retry.
        (cd debs && { apt-get download -q "$KPKG" 2>/dev/null ||
                      { apt_update; apt-get download -q "$KPKG"; }; }) ||
            die "apt-get download $KPKG failed"
    fi
    mkdir kernel.tmp
    dpkg-deb -x debs/"${KPKG}"_*.deb kernel.tmp
    # The host has no kmod: busybox writes modules.dep for busybox modprobe in the guest.
    busybox depmod -b "$VM_DIR/kernel.tmp" "$KVER"
    mv kernel.tmp kernel
    rm -f debs/*.deb
    echo "$KVER" > KVER
fi

if [ ! -s vmlinux ]; then
    vmlinuz=kernel/boot/vmlinuz-$KVER
    off=$(LC_ALL=C grep -obUaP -m1 '\xfd7zXZ\x00' "$vmlinuz" | head -n1 | cut -d: -f1)
    [ -n "$off" ] || die "no xz payload in $vmlinuz"
    # xz stops at the end of its stream; the trailing bytes of the bzImage are ignored.
    tail -c +$((off + 1)) "$vmlinuz" | xz -dc --single-stream > vmlinux.tmp || true
    [ "$(head -c4 vmlinux.tmp | od -An -tx1 | tr -d ' ')" = 7f454c46 ] ||
        die "could not unpack an ELF vmlinux from $vmlinuz"
    mv vmlinux.tmp vmlinux
fi

# -- initramfs: rebuilt when guest-init.sh or this script changes
if [ ! -s initramfs.cpio.gz ] || [ "$HERE/guest-init.sh" -nt initramfs.cpio.gz ] ||
        [ "$HERE/setup.sh" -nt initramfs.cpio.gz ]; then
    moddir=kernel/lib/modules/$KVER
    deps() {  # module name -> its .ko path and those of its dependencies, dependencies first
        local line
        line=$(grep -m1 -E "(^|/)${1//[-_]/[-_]}\.ko(\.xz)?:" "$moddir/modules.dep") ||
            die "module $1 not found in $moddir/modules.dep"
        for d in ${line#*:}; do deps "$(basename "${d%.xz}" .ko)"; done
        echo "${line%%:*}"
    }
    rm -rf initramfs.d
    mkdir -p initramfs.d/bin initramfs.d/dev initramfs.d/proc initramfs.d/sys \
        initramfs.d/root initramfs.d/lower initramfs.d/rw "initramfs.d/lib/modules/$KVER"
    cp /bin/busybox initramfs.d/bin/
    for applet in $(busybox --list); do
        [ "$applet" = busybox ] || ln -s busybox "initramfs.d/bin/$applet"
    done
    ln -s bin initramfs.d/sbin
    kos=$(for m in $MODULES; do deps "$m"; done | awk '!seen[$0]++')
    for ko in $kos; do
        mkdir -p "initramfs.d/lib/modules/$KVER/$(dirname "$ko")"
        cp "$moddir/$ko" "initramfs.d/lib/modules/$KVER/$ko"
    done
    busybox depmod -b "$VM_DIR/initramfs.d" "$KVER"
    cp "$HERE/guest-init.sh" initramfs.d/init
    chmod 755 initramfs.d/init
    echo "$MODULES" > initramfs.d/modules
    (cd initramfs.d && find . | busybox cpio -o -H newc 2>/dev/null) | gzip -1 \
        > initramfs.cpio.gz.tmp
    mv initramfs.cpio.gz.tmp initramfs.cpio.gz
    rm -rf initramfs.d
fi
echo "tools/vm/setup.sh: kernel $KVER ready in $VM_DIR"
