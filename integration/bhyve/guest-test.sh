#!/bin/sh
# vipshare data-plane scenarios, run INSIDE a FreeBSD VM whose kernel carries
# kernel-patches/ (booted by run.sh). Three vnet jails share the VIP behind an
# if_bridge, a client jail connects from many source addresses, and every
# connection must be answered by exactly the host that owns the source's
# bucket (B=4).
#
# The server jails are programmed with the same kernel state the FreeBSD
# backend of vipshare-agent produces (node-agent/tests/golden/*.txt):
#  -m recipe  (stock kernel + 0002): VIP as a CARP-INIT alias, lowbits
#             buckets (last octet & 3) as ipfw mask rules in owned set 3
#             swapped in from staging set 4, lease end = set 3 disabled (what
#             the agent's watchdog does);
#  -m patched (0001-0004): VIP added with the shared-address flag, one
#             `srcjhash` rule, ownership and lease end as kernel lease-map
#             deadlines (golden srcjhash_leases.txt); needs the patched
#             ipfw(8) as $IPFW (default: ipfw next to this script).
# Both: published multicast ARP entry, base set 5 with the established-skip
# and the deny.
#
# usage: guest-test.sh [-m recipe|patched] [REPORT_FILE]
#        (prints and writes "N passed, M failed")
set -eu

MODE=recipe
while getopts m: opt; do
	case $opt in
	m) MODE=$OPTARG ;;
	*)
		echo "usage: $0 [-m recipe|patched] [REPORT_FILE]" >&2
		exit 2
		;;
	esac
done
shift $((OPTIND - 1))
case $MODE in
recipe | patched) ;;
*)
	echo "guest-test.sh: -m must be recipe or patched, not $MODE" >&2
	exit 2
	;;
esac
HERE=$(cd "$(dirname "$0")" && pwd)
IPFW=${IPFW:-$HERE/ipfw}
SEED=0x4e4c4221
REPORT=${1:-/root/vipshare-report.txt}
VIP=192.0.2.10
MAC=01:00:5e:56:53:01
PORT=8080
NSRC=${NSRC:-64}
SERVERS="srv1 srv2 srv3"
WORK=/tmp/vipshare-bhyve

passed=0
failed=0
: >"$REPORT"
echo "mode: $MODE" >>"$REPORT"

say() {
	echo "$*" | tee -a "$REPORT"
}

result() {
	# result NAME OK DETAIL
	if [ "$2" = 1 ]; then
		passed=$((passed + 1))
		say "PASS $1"
	else
		failed=$((failed + 1))
		say "FAIL $1: $3"
	fi
}

cleanup() {
	for j in $SERVERS client; do
		jail -r "$j" 2>/dev/null || true
	done
	for e in $(ifconfig -l); do
		case $e in
		epair*a | bridge*) ifconfig "$e" destroy 2>/dev/null || true ;;
		esac
	done
}
trap cleanup EXIT

kldload -n ipfw carp if_bridge if_epair
mkdir -p "$WORK"
if [ "$MODE" = patched ]; then
	sysctl -n net.inet.ip.shared_addr >/dev/null ||
		{ echo "kernel lacks kernel-patches/0001" >&2; exit 1; }
	sysctl -n net.inet.ip.fw.srcjhash_enable >/dev/null ||
		{ echo "kernel lacks kernel-patches/0003" >&2; exit 1; }
	[ -x "$IPFW" ] ||
		{ echo "no patched ipfw(8) at $IPFW (kernel-patches/0004)" >&2; exit 1; }
	cc -O2 -Wall -Werror -I"$HERE" -o "$WORK/helper" "$HERE/helper.c"
else
	IPFW=ipfw
fi
grep -q '^vipshare-test' /etc/services ||
	printf 'vipshare-test\t%s/tcp\n' "$PORT" >>/etc/services

bridge=$(ifconfig bridge create)
ifconfig "$bridge" up

# mkjail NAME ADDR: a vnet jail on its own epair, the other end on the bridge.
mkjail() {
	ep=$(ifconfig epair create)
	ep=${ep%a}
	ifconfig "$bridge" addm "${ep}a"
	ifconfig "${ep}a" up
	jail -c name="$1" vnet persist path=/ host.hostname="$1" \
	    vnet.interface="${ep}b"
	jexec "$1" ifconfig lo0 up
	jexec "$1" ifconfig "${ep}b" inet "$2/24" up
	echo "${ep}b"
}

# ipfw_swap_owned JAIL BUCKET...: replace the owned set atomically.
ipfw_swap_owned() {
	j=$1
	shift
	jexec "$j" ipfw -q delete set 4 2>/dev/null || true
	n=10100
	for b in "$@"; do
		jexec "$j" ipfw -q add "$n" set 4 skipto 11000 ip \
		    from "0.0.0.$b:0.0.0.3" to "$VIP" in
		n=$((n + 1))
	done
	jexec "$j" ipfw -q set swap 4 3
	jexec "$j" ipfw -q set enable 3
	jexec "$j" ipfw -q delete set 4 2>/dev/null || true
}

# lease JAIL SECONDS BUCKET...: write the jail's srcjhash lease map (0003):
# BUCKETs owned until SECONDS from now (absolute uptime), the rest not.
lease() {
	j=$1
	secs=$2
	shift 2
	ranges=$(echo "$@" | tr ' ' ',')
	[ -n "$ranges" ] || ranges=-
	now=$("$WORK/helper" uptime-ns)
	jexec "$j" sysctl -q \
	    net.inet.ip.fw.srcjhash_lease="0 $((now + secs * 1000000000)) $ranges" \
	    >/dev/null
}

# own JAIL BUCKET...: give the jail exactly these buckets (with a long lease).
own() {
	if [ "$MODE" = patched ]; then
		j=$1
		shift
		lease "$j" 600 "$@"
	else
		ipfw_swap_owned "$@"
	fi
}

# bucket_of N: the bucket of source 192.0.2.N.
bucket_of() {
	if [ "$MODE" = patched ]; then
		"$WORK/helper" bucket "$SEED" 4 "192.0.2.$1"
	else
		echo $(($1 & 3))
	fi
}
i=1
for s in $SERVERS; do
	ifc=$(mkjail "$s" "192.0.2.$i")
	i=$((i + 1))
	if [ "$MODE" = patched ]; then
		jexec "$s" sysctl -q net.inet.ip.shared_addr=1 \
		    net.inet.tcp.accept_l2mcast=1 \
		    net.inet.ip.fw.srcjhash_enable=1 >/dev/null
	else
		jexec "$s" sysctl -q net.inet.carp.allow=0 >/dev/null
		jexec "$s" sysctl -q net.inet.tcp.accept_l2mcast=2 >/dev/null
	fi
	jexec "$s" ipfw -q add 65000 allow ip from any to any
	jexec "$s" ipfw -q set disable 4
	jexec "$s" ipfw -q set disable 6
	jexec "$s" ipfw -q add 10000 set 5 skipto 11000 tcp from any to "$VIP" in established
	jexec "$s" ipfw -q add 10900 set 5 deny ip from any to "$VIP" in
	if [ "$MODE" = patched ]; then
		jexec "$s" "$WORK/helper" add-shared "$ifc" "$VIP/32"
		lease "$s" 600
		jexec "$s" "$IPFW" -q add 10100 set 3 skipto 11000 ip from any \
		    to "$VIP" in srcjhash 0 buckets 4 seed "$SEED" affinity address
	else
		jexec "$s" ifconfig "$ifc" vhid 200 advskew 254
		jexec "$s" ifconfig "$ifc" inet "$VIP/32" alias vhid 200
	fi
	jexec "$s" arp -S "$VIP" "$MAC" pub >/dev/null
	# One line with the server's name, then echo every line prefixed by it.
	cat >"$WORK/$s.sh" <<SRV
#!/bin/sh
echo $s
while read -r line; do echo "$s \$line"; done
SRV
	chmod +x "$WORK/$s.sh"
	printf 'vipshare-test stream tcp nowait root %s %s\n' \
	    "$WORK/$s.sh" "$s.sh" >"$WORK/$s.inetd.conf"
	jexec "$s" inetd -p "$WORK/$s.inetd.pid" "$WORK/$s.inetd.conf"
done

cifc=$(mkjail client 192.0.2.100)
# Accept the VIP's ARP replies although they carry a multicast MAC.
jexec client sysctl -q net.link.ether.inet.allow_multicast=1 >/dev/null
src=101
while [ "$src" -lt $((101 + NSRC)) ]; do
	jexec client ifconfig "$cifc" inet "192.0.2.$src/32" alias
	src=$((src + 1))
done

# owner BUCKET: prints the server owning BUCKET in the current assignment.
owner() {
	case $1 in
	0) echo "$own_0" ;;
	1) echo "$own_1" ;;
	2) echo "$own_2" ;;
	3) echo "$own_3" ;;
	esac
}

# check_all NAME: one connection per source address; each must be answered by
# the owner of its bucket ("none" expected where no server owns it).
check_all() {
	ok=1
	detail=""
	src=101
	while [ "$src" -lt $((101 + NSRC)) ]; do
		want=$(owner "$(bucket_of "$src")")
		got=$(jexec client nc -w 2 -s "192.0.2.$src" "$VIP" "$PORT" \
		    </dev/null 2>/dev/null | head -n 1)
		[ -n "$got" ] || got=none
		if [ "$got" != "$want" ]; then
			ok=0
			detail="$detail 192.0.2.$src:want=$want,got=$got"
		fi
		src=$((src + 1))
	done
	result "$1" "$ok" "$detail"
}

# Scenario 1: srv1 owns {0}, srv2 {1}, srv3 {2,3}.
own_0=srv1 own_1=srv2 own_2=srv3 own_3=srv3
own srv1 0
own srv2 1
own srv3 2 3
check_all "every connection answered by its bucket's owner"

# Scenario 2: move bucket 3 from srv3 to srv1 (release first, then acquire).
own srv3 2
own_3=none
check_all "released bucket is answered by nobody"
own srv1 0 3
own_3=srv1
check_all "moved bucket is answered by its new owner"

# Scenario 3: an established connection survives its bucket moving (the
# first source in bucket 2, owned by srv3, moved to srv2 mid-connection).
long_src=101
while [ "$(bucket_of "$long_src")" != 2 ]; do
	long_src=$((long_src + 1))
done
( (echo before; sleep 3; echo after) |
	jexec client nc -w 5 -s "192.0.2.$long_src" "$VIP" "$PORT" >"$WORK/long.out" ) &
long=$!
sleep 1
own srv3
own srv2 1 2
own_2=srv2
wait "$long" || true
if [ "$(cat "$WORK/long.out")" = "$(printf 'srv3\nsrv3 before\nsrv3 after')" ]; then
	result "established connection stays on its host across a move" 1 ""
else
	result "established connection stays on its host across a move" 0 \
	    "$(tr '\n' '|' <"$WORK/long.out")"
fi
check_all "new connections go to the bucket's new owner"

# Scenario 4: srv2's lease runs out. recipe: its watchdog disables the owned
# set; patched: nobody does anything, the kernel's deadline passes.
if [ "$MODE" = patched ]; then
	lease srv2 2 1 2
	sleep 3
else
	jexec srv2 ipfw -q set disable 3
fi
own_1=none own_2=none
check_all "expired host accepts no new connections"

say "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
