#!/usr/bin/env bash
# The one command that runs every vipshare test, as root: `scripts/test.sh`
# (or `sudo scripts/test.sh`).
# Installs what the tests need, checks formatting and lints, builds, runs the unit,
# property, kernel (network namespace) and multi-process tests, then the simulator.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: the data-plane tests need root (network namespaces, nftables): run it as root (or sudo $0)" >&2
  exit 1
fi
# shellcheck source=scripts/lib/cargo-path.sh
source scripts/lib/cargo-path.sh
scripts/install-deps.sh

step() { printf '\n==> %s\n' "$*"; }
SECONDS=0
step "format";  cargo fmt --all -- --check
step "lint";    cargo clippy --workspace --all-targets --locked -- -D warnings
step "build";   cargo build --workspace --bins --locked
# Includes `promtool check metrics` on live controller and agent /metrics
# (integration/tests/operator.rs, controller_and_agent_metrics_pass_promtool).
step "test";    cargo test --workspace --locked --no-fail-fast -- --test-threads=2
step "busy hosts: steady state and two crashes with the CPUs oversubscribed 2x (stress-ng)"
cargo test -p vipshare-integration --test scenarios --locked -- --ignored --test-threads=1 oversubscribed --nocapture
step "kernel patches: git apply --check against the stored FreeBSD texts, the srcjhash hash in C"
kernel-patches/check.sh
step "simulator: 500 seeds"
cargo run --release --locked -p vipshare-sim -- --seeds 500
step "shell scripts"
mapfile -t scripts < <(git ls-files '*.sh' 'deploy/freebsd/rc.d/*')
shellcheck -x "${scripts[@]}"
step "deployment files (promtool, dashboard, units)"
deploy/check.sh
step "all tests passed in ${SECONDS}s"
