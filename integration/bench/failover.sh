#!/usr/bin/env bash
# Host failover benchmark: vipshare (default and tuned timing) against keepalived
# VRRP (advert_int 1 s and 0.1 s) in the same network-namespace lab, 20 crashes
# each, measured from the client side every 10 ms.
#
#   sudo integration/bench/failover.sh [--trials N] [--only vipshare|keepalived]
#
# Writes integration/bench/failover.md (the table), failover.csv (every trial)
# and failover.png (the chart). Details: integration/examples/failover_bench.rs.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" -ne 0 ]; then
  echo "failover.sh: needs root (network namespaces, nftables, keepalived): sudo $0" >&2
  exit 1
fi
scripts/install-deps.sh
if ! command -v gnuplot >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends gnuplot-nox
fi
cargo build --release --locked --workspace --bins
VIPSHARE_PROFILE=release cargo run --release --locked -p vipshare-integration \
  --example failover_bench -- "$@"
