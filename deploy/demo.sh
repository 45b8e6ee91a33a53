#!/usr/bin/env bash
# vipshare demo: 3 controllers and 4 hosts sharing an IPv4 and an IPv6 VIP in network
# namespaces on this machine, real certificates, client traffic over both, a host
# crash and its failover.
#
#   deploy/demo.sh                 # as root (or: sudo deploy/demo.sh); builds, runs, cleans up on exit or Ctrl-C
#   KEEP=1 deploy/demo.sh          # leave the lab running at the end (lab_down later)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: needs root for network namespaces and nftables: run it as root (or sudo $0)" >&2
  exit 1
fi
if ! ip netns add vsd-probe 2>/dev/null; then
  echo "demo: cannot create network namespaces here (a container without CAP_SYS_ADMIN?)." >&2
  echo "      Run it on a Linux host or VM where 'ip netns add' works." >&2
  exit 1
fi
ip netns delete vsd-probe

# shellcheck source=scripts/lib/cargo-path.sh
source scripts/lib/cargo-path.sh
scripts/install-deps.sh
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building (release)"
cargo build --release --locked -p vipshare-controller -p vipsharectl -p vipshare-agent

# shellcheck source=integration/lab/netns.sh
source integration/lab/netns.sh
if [ -z "${KEEP:-}" ]; then trap 'lab_down; echo "lab removed"' EXIT; fi

say "creating the lab: bridge, 3 controllers, 4 hosts, a client with 200 addresses"
lab_up 3 4 200
lab_certs
for i in 1 2 3; do lab_start_controller "$i"; done

say "waiting for a raft leader"
ctl status --wait 20 >/dev/null
ctl cluster init --vip "$VIP" --vip "$VIP6" --buckets 256
for i in 1 2 3 4; do
  ctl member add "h$i"
  lab_start_server "$i"
  lab_start_agent "$i"
done

say "waiting until every bucket has an owner"
# Exit status 0 only when healthy: a leader, no unowned bucket, no member down.
ctl status --wait 20 || echo "  not healthy after 20 s (exit status $?)"
ctl members
ctl buckets

# $2: the sources, split into words on purpose.
# shellcheck disable=SC2086
tally1() { lab_client once "$1" "$PORT" $2 | python3 -c '
import json, sys, collections
r = json.load(sys.stdin)
c = collections.Counter(v for v in r.values())
print("  answers by host over " + sys.argv[1] + ":", dict(sorted(c.items())))' "$3"; }
tally() {
  tally1 "$VIP" "$(lab_sources)" IPv4
  tally1 "$VIP6" "$(lab_sources6)" IPv6
}

say "200 clients, one new connection each, to $VIP and to $VIP6"
tally
ctl which 10.77.2.7
ctl which fd77::2:7
echo "  the client's neighbour entries (ARP and ND answered with the cluster's multicast MACs):"
ns "${LAB}-cl" ip neigh show "$VIP" | sed 's/^/  /'
ns "${LAB}-cl" ip -6 neigh show "$VIP6" | sed 's/^/  /'

say "crashing host h2 (agent and server killed, link down)"
start=$(date +%s%N)
lab_crash_host 2
for _ in $(seq 1 300); do
  if ctl members --json | python3 -c '
import json, sys
m = {x["name"]: x for x in json.load(sys.stdin)["members"]}
sys.exit(0 if m["h2"]["buckets"] == 0 else 1)'; then break; fi
  sleep 0.05
done
echo "  h2's buckets reassigned after $((($(date +%s%N) - start) / 1000000)) ms"
ctl members
tally

say "h2 comes back (re-admitted after a stable period)"
lab_revive_host 2
sleep 8
ctl members
tally

if [ -n "${KEEP:-}" ]; then
  echo "lab left running in $LAB_DIR; 'source integration/lab/netns.sh; lab_down' removes it"
fi
