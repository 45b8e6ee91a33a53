#!/usr/bin/env bash
# A vipshare lab in network namespaces, sourced by deploy/demo.sh and the failover
# benchmark. One bridge namespace; controllers, hosts and a client on it:
#
#   ${LAB}-sw   bridge br0
#   ${LAB}-cN   controller N        10.77.0.N/16          :7001
#   ${LAB}-hN   host N (agent+srv)  10.77.0.(10+N)/16     VIP 10.77.0.100
#   ${LAB}-cl   client              10.77.2.1 .. 10.77.2.K /16
#
# Every address 10.77.A.B also has an IPv6 twin fd77::A:B/64 (VIP6 fd77::100).
#
# Every function is idempotent enough to be re-run after a failure; lab_down
# removes everything the lab created.

LAB=${LAB:-vsd}
LAB_DIR=${LAB_DIR:-/tmp/${LAB}-lab}
VIP=${VIP:-10.77.0.100}
VIP6=${VIP6:-fd77::100}
PORT=${PORT:-8080}
CLUSTER=${CLUSTER:-demo}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
LAB_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

ns() { ip netns exec "$1" "${@:2}"; }
# Daemons start with `ip netns exec ... &`, not through `ns`: a backgrounded
# function runs in a subshell, so $! would be the subshell and a kill would
# leave the daemon running (a "crashed" host's agent kept its tables).

lab_log() { printf '[lab] %s\n' "$*" >&2; }

# The IPv6 twin of 10.77.A.B: fd77::A:B.
v6of() {
  local c d
  IFS=. read -r _ _ c d <<<"$1"
  printf 'fd77::%s:%s' "$c" "$d"
}

# Both addresses of $2 on eth0 of namespace $1 (no DAD: usable at once).
lab_addr() {
  ns "$1" ip addr add "$2/16" dev eth0
  ns "$1" ip addr add "$(v6of "$2")/64" dev eth0 nodad
}

# veth from namespace $1 (named eth0 there) to the bridge, with address $2.
lab_attach() {
  local name=$1 addr=$2 peer="v${1#"${LAB}"-}"
  ip netns add "$name"
  # No DAD for the link-local address either: while it is tentative the host
  # sends no neighbour solicitation, so it could not resolve a client at first.
  ns "$name" sh -c 'echo 0 >/proc/sys/net/ipv6/conf/default/accept_dad'
  ip link add "$peer" type veth peer name eth0 netns "$name"
  ip link set "$peer" netns "${LAB}-sw"
  ns "${LAB}-sw" ip link set "$peer" master br0 up
  ns "$name" ip link set lo up
  ns "$name" ip link set eth0 up
  lab_addr "$name" "$addr"
}

# lab_up CONTROLLERS HOSTS CLIENT_ADDRS
lab_up() {
  local nctl=$1 nhost=$2 ncl=$3 i
  lab_down 2>/dev/null || true
  rm -rf "$LAB_DIR"
  mkdir -p "$LAB_DIR"
  ip netns add "${LAB}-sw"
  ns "${LAB}-sw" ip link add br0 type bridge
  ns "${LAB}-sw" ip link set br0 up
  for i in $(seq 1 "$nctl"); do lab_attach "${LAB}-c$i" "10.77.0.$i"; done
  for i in $(seq 1 "$nhost"); do lab_attach "${LAB}-h$i" "10.77.0.$((10 + i))"; done
  lab_attach "${LAB}-cl" 10.77.2.1
  for i in $(seq 2 "$ncl"); do
    lab_addr "${LAB}-cl" "10.77.2.$i"
  done
  echo "$nctl" >"$LAB_DIR/controllers"
  echo "$nhost" >"$LAB_DIR/hosts"
  echo "$ncl" >"$LAB_DIR/clients"
}

lab_sources() {
  local i
  for i in $(seq 1 "$(cat "$LAB_DIR/clients")"); do printf '10.77.2.%s ' "$i"; done
}

lab_sources6() {
  local i
  for i in $(seq 1 "$(cat "$LAB_DIR/clients")"); do printf 'fd77::2:%s ' "$i"; done
}

lab_controllers_csv() {
  local i out=""
  for i in $(seq 1 "$(cat "$LAB_DIR/controllers")"); do out="$out${out:+,}10.77.0.$i:7001"; done
  echo "$out"
}

lab_certs() {
  local d="$LAB_DIR/pki" i
  rm -rf "$d"
  "$BIN/vipsharectl" certs init --dir "$d" --cluster "$CLUSTER" >/dev/null
  for i in $(seq 1 "$(cat "$LAB_DIR/controllers")"); do
    "$BIN/vipsharectl" certs issue --dir "$d" --role controller --name "$i" --ip "10.77.0.$i" >/dev/null
  done
  for i in $(seq 1 "$(cat "$LAB_DIR/hosts")"); do
    "$BIN/vipsharectl" certs issue --dir "$d" --role agent --name "h$i" >/dev/null
  done
  "$BIN/vipsharectl" certs issue --dir "$d" --role admin --name admin >/dev/null
}

lab_start_controller() {
  local i=$1 n peers="" j
  n=$(cat "$LAB_DIR/controllers")
  for j in $(seq 1 "$n"); do
    peers="${peers}[[peers]]
id = $j
address = \"10.77.0.$j:7001\"
"
  done
  cat >"$LAB_DIR/controller-$i.toml" <<EOF
id = $i
cluster = "$CLUSTER"
listen = "10.77.0.$i:7001"
data_dir = "$LAB_DIR/controller-$i"
[tls]
ca = "$LAB_DIR/pki/ca.crt"
cert = "$LAB_DIR/pki/controller-$i.crt"
key = "$LAB_DIR/pki/controller-$i.key"
$peers
EOF
  ip netns exec "${LAB}-c$i" "$BIN/vipshare-controller" --config "$LAB_DIR/controller-$i.toml" \
    >>"$LAB_DIR/controller-$i.log" 2>&1 &
  echo $! >"$LAB_DIR/controller-$i.pid"
  disown
}

lab_start_agent() {
  local i=$1 n j ctl=""
  n=$(cat "$LAB_DIR/controllers")
  for j in $(seq 1 "$n"); do
    ctl="${ctl}[[controllers]]
id = $j
address = \"10.77.0.$j:7001\"
"
  done
  cat >"$LAB_DIR/agent-h$i.toml" <<EOF
member = "h$i"
interface = "eth0"
backend = "linux"
# One state file per agent: four agents on one machine must not share the
# default /var/lib/vipshare, nor inherit floors from an earlier lab's cluster.
state_dir = "$LAB_DIR/agent-h$i-state"
[tls]
ca = "$LAB_DIR/pki/ca.crt"
cert = "$LAB_DIR/pki/agent-h$i.crt"
key = "$LAB_DIR/pki/agent-h$i.key"
$ctl
EOF
  ip netns exec "${LAB}-h$i" "$BIN/vipshare-agent" --config "$LAB_DIR/agent-h$i.toml" \
    >>"$LAB_DIR/agent-h$i.log" 2>&1 &
  echo $! >"$LAB_DIR/agent-h$i.pid"
  disown
}

lab_start_server() {
  local i=$1
  # The agent adds the VIPs; the server binds any address (IPv4 and IPv6) and
  # answers on the VIPs.
  ip netns exec "${LAB}-h$i" python3 "$LAB_SRC/server.py" "h$i" :: "$PORT" \
    >>"$LAB_DIR/server-h$i.log" 2>&1 &
  echo $! >"$LAB_DIR/server-h$i.pid"
  disown
}

lab_kill() { # lab_kill NAME [SIGNAL]
  local f="$LAB_DIR/$1.pid"
  [ -f "$f" ] || return 0
  kill "-${2:-KILL}" "$(cat "$f")" 2>/dev/null || true
  if [ "${2:-KILL}" = KILL ]; then rm -f "$f"; fi
}

# A host crash: agent and server killed, link down.
lab_crash_host() {
  local i=$1
  lab_kill "agent-h$i"
  lab_kill "server-h$i"
  ns "${LAB}-sw" ip link set "vh$i" down
}

lab_revive_host() {
  local i=$1
  ns "${LAB}-sw" ip link set "vh$i" up
  lab_start_server "$i"
  lab_start_agent "$i"
}

ctl() {
  ns "${LAB}-cl" "$BIN/vipsharectl" --controllers "$(lab_controllers_csv)" \
    --tls-dir "$LAB_DIR/pki" --user admin-admin "$@"
}

lab_client() { ns "${LAB}-cl" python3 "$LAB_SRC/client.py" "$@"; }

lab_down() {
  local f
  for f in "$LAB_DIR"/*.pid; do
    [ -f "$f" ] || continue
    kill -KILL "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
  # Anything still running from this lab (e.g. an earlier run killed hard).
  pkill -KILL -f "$LAB_DIR/" 2>/dev/null || true
  for f in $(ip netns list | awk '{print $1}' | grep "^${LAB}-" || true); do
    ip netns delete "$f" || true
  done
}
