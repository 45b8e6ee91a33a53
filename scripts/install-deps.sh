#!/usr/bin/env bash
# Installs what vipshare's demo and tests need on a fresh Debian/Ubuntu machine.
# Idempotent: does nothing when everything is present. Needs root for apt.
set -euo pipefail
need=()
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import yaml' >/dev/null 2>&1 || need+=(python3-yaml)
command -v keepalived >/dev/null 2>&1 || need+=(keepalived)
command -v stress-ng >/dev/null 2>&1 || need+=(stress-ng)
# integration/tests/switch_modes.rs: no frame from a shared unicast MAC.
command -v tcpdump >/dev/null 2>&1 || need+=(tcpdump)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing ${need[*]}; run as root (or sudo $0) or install them yourself" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
command -v cargo >/dev/null 2>&1 || { echo "install-deps: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }
