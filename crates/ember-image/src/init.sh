#!/bin/sh
# Ember's initramfs: insert the virtio drivers, wait for the root disk, mount
# it and hand PID 1 to the root filesystem's /sbin/init (ember-guest).
# Every line it prints goes to the serial console with a prefix, so a boot
# that stops here says where and why.
#
# Kernel command line: root= (default /dev/vda), init= (default /sbin/init),
# ember.rootwait=<seconds> (default 30), and <module>.<param>=<value>, passed
# to that module as modprobe would. Everything else reaches init unchanged.

export PATH=/bin

say() {
    echo "ember-initramfs: $*"
}

fail() {
    say "FATAL: $*"
    say "stopping: the kernel will panic and, with panic=1, end the VM"
    sleep 1
    exit 1
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"

root=/dev/vda
init=/sbin/init
rootwait=30
cmdline=$(cat /proc/cmdline)
for arg in $cmdline; do
    case "$arg" in
        root=*) root=${arg#root=} ;;
        init=*) init=${arg#init=} ;;
        ember.rootwait=*) rootwait=${arg#ember.rootwait=} ;;
    esac
done

# insmod, unlike modprobe, does not read module parameters from the kernel
# command line.
params_for() {
    found=""
    for arg in $cmdline; do
        case "$arg" in
            "$1".*=*) found="$found ${arg#"$1".}" ;;
        esac
    done
    echo "$found"
}

say "loading modules"
while read -r name need; do
    module=/lib/modules/$name.ko
    params=$(params_for "$name")
    # shellcheck disable=SC2086 # one word per parameter
    if err=$(insmod "$module" $params 2>&1); then
        continue
    fi
    if [ -n "$params" ] && err=$(insmod "$module" 2>&1); then
        say "$name: loaded without the parameters it rejected:$params"
        continue
    fi
    if [ "$need" = required ]; then
        say "ERROR: required module $name did not load: $err"
    else
        say "optional module $name did not load: $err"
    fi
done < /lib/modules/load-order

say "waiting for root disk $root"
tries=$((rootwait * 10))
while [ ! -b "$root" ]; do
    if [ "$tries" -le 0 ]; then
        say "block devices: $(ls /sys/class/block 2>/dev/null | tr '\n' ' ')"
        fail "root disk $root did not appear within ${rootwait}s: does the VM have a virtio block device, and did virtio_blk load?"
    fi
    tries=$((tries - 1))
    sleep 0.1
done

mount -t ext4 -o rw "$root" /newroot || fail "cannot mount $root as ext4"
if [ ! -x "/newroot$init" ] && [ ! -L "/newroot$init" ]; then
    fail "$init is missing or not executable on $root"
fi

say "starting $init from $root at $(cut -d ' ' -f 1 /proc/uptime)s"
# The new init finds /dev populated, as the kernel's devtmpfs.mount would
# leave it; /proc and /sys it mounts itself.
mount -o move /dev /newroot/dev 2>/dev/null || umount /dev
umount /sys
umount /proc
exec switch_root /newroot "$init" "$@"
