#!/bin/sh
# Boots a FreeBSD VM with the vipshare-patched kernel in bhyve and runs
# guest-test.sh inside it (vnet jails + epair + if_bridge). Run on a FreeBSD
# host as root. Not run in this project's CI (which is Linux).
#
# usage: run.sh -i IMAGE -k KERNEL_DIR [-u IPFW] [-m MEMORY] [-c CPUS] [-t TIMEOUT_S] [-K]
#   -i  FreeBSD 14.4 VM image (raw, e.g. FreeBSD-14.4-RELEASE-amd64-ufs.raw,
#       uncompressed); a copy is used, the image itself is not modified
#   -k  directory holding the patched kernel (e.g. the `kernel` and modules
#       installed by `make installkernel DESTDIR=...`: DESTDIR/boot/kernel)
#   -u  the patched ipfw(8) binary (kernel-patches/0004); with it the guest
#       also runs the scenarios in "patched" mode (flag + srcjhash)
#   -m  guest memory (default 2G), -c guest CPUs (default 2)
#   -t  give up after this many seconds (default 900)
#   -K  keep the work directory (disk copy, console log)
#
# Prints the guest's reports ("N passed, M failed" per mode) and exits 0 only
# if every scenario of every mode passed.
set -eu

image=""
kernel=""
ipfw_bin=""
mem=2G
cpus=2
timeout=900
keep=0
while getopts i:k:u:m:c:t:K opt; do
	case $opt in
	i) image=$OPTARG ;;
	k) kernel=$OPTARG ;;
	u) ipfw_bin=$OPTARG ;;
	m) mem=$OPTARG ;;
	c) cpus=$OPTARG ;;
	t) timeout=$OPTARG ;;
	K) keep=1 ;;
	*)
		sed -n '6,19p' "$0" >&2
		exit 2
		;;
	esac
done

die() {
	echo "run.sh: $*" >&2
	exit 1
}

[ "$(uname -s)" = FreeBSD ] || die "needs a FreeBSD host with bhyve"
[ "$(id -u)" = 0 ] || die "needs root"
[ -f "$image" ] || die "no image (-i)"
[ -f "$kernel/kernel" ] || die "no kernel in $kernel (-k)"
[ -z "$ipfw_bin" ] || [ -x "$ipfw_bin" ] || die "-u $ipfw_bin is not an executable"
here=$(cd "$(dirname "$0")" && pwd)

kldload -n vmm nmdm
vm="vipshare-$$"
work=$(mktemp -d /tmp/vipshare-bhyve.XXXXXX)
md=""
mnt="$work/mnt"
mkdir -p "$mnt"

# shellcheck disable=SC2317  # invoked by the trap below
cleanup() {
	bhyvectl --destroy --vm="$vm" >/dev/null 2>&1 || true
	umount "$mnt" 2>/dev/null || true
	if [ -n "$md" ]; then
		mdconfig -d -u "$md" 2>/dev/null || true
	fi
	if [ "$keep" = 1 ]; then
		echo "kept: $work"
	else
		rm -rf "$work"
	fi
}
trap cleanup EXIT INT TERM

# attach_root: attaches the disk copy and mounts its UFS root on $mnt.
attach_root() {
	md=$(mdconfig -a -t vnode -f "$work/disk.img")
	part=$(gpart show -p "$md" | awk '$4 == "freebsd-ufs" { print $3; exit }')
	[ -n "$part" ] || die "no freebsd-ufs partition on $image"
	mount "/dev/$part" "$mnt"
}

detach_root() {
	umount "$mnt"
	mdconfig -d -u "$md"
	md=""
}

cp "$image" "$work/disk.img"
attach_root
# The patched kernel replaces the image's, the old one stays as kernel.old.
rm -rf "$mnt/boot/kernel.old"
mv "$mnt/boot/kernel" "$mnt/boot/kernel.old"
cp -R "$kernel" "$mnt/boot/kernel"
mkdir -p "$mnt/root/vipshare"
cp "$here/guest-test.sh" "$here/helper.c" \
    "$here/../../kernel-patches/hash/ip_fw_jhash.h" "$mnt/root/vipshare/"
modes=recipe
if [ -n "$ipfw_bin" ]; then
	cp "$ipfw_bin" "$mnt/root/vipshare/ipfw"
	modes="recipe patched"
fi
cat >"$mnt/etc/rc.local" <<RC
#!/bin/sh
# vipshare bhyve harness: run the scenarios once per mode, then power off.
status=0
for m in $modes; do
	sh /root/vipshare/guest-test.sh -m "\$m" /root/vipshare/report-\$m.txt \\
	    >/root/vipshare/console-\$m.txt 2>&1 || status=1
	cat /root/vipshare/report-\$m.txt >>/root/vipshare/report.txt
done
echo "vipshare-guest-exit=\$status" >>/root/vipshare/report.txt
rm -f /etc/rc.local
shutdown -p now
RC
printf 'autoboot_delay="1"\nconsole="comconsole"\n' >>"$mnt/boot/loader.conf"
detach_root

echo "booting $vm (log: $work/console.log)"
bhyveload -m "$mem" -d "$work/disk.img" -c stdio "$vm" </dev/null >"$work/console.log" 2>&1
bhyve -c "$cpus" -m "$mem" -A -H -P \
    -s 0:0,hostbridge -s 1:0,lpc -s 2:0,virtio-blk,"$work/disk.img" \
    -l com1,stdio "$vm" </dev/null >>"$work/console.log" 2>&1 &
pid=$!
elapsed=0
while kill -0 "$pid" 2>/dev/null; do
	if [ "$elapsed" -ge "$timeout" ]; then
		kill "$pid" 2>/dev/null || true
		die "timed out after ${timeout}s; see $work/console.log (use -K)"
	fi
	sleep 5
	elapsed=$((elapsed + 5))
done
wait "$pid" || true

attach_root
[ -f "$mnt/root/vipshare/report.txt" ] || die "the guest wrote no report; see $work/console.log (use -K)"
cat "$mnt/root/vipshare/report.txt"
status=1
if grep -q '^vipshare-guest-exit=0$' "$mnt/root/vipshare/report.txt"; then
	status=0
fi
detach_root
exit "$status"
