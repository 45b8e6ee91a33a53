# shellcheck shell=bash
# Sourced by the root-only scripts: finds cargo when they run as root without a
# login shell, or under sudo, whose secure_path drops ~/.cargo/bin. Prefers the
# invoking user's toolchain (SUDO_USER), then root's own.
cargo_path() {
  command -v cargo >/dev/null 2>&1 && return 0
  local home
  for home in "${CARGO_HOME:-}" \
    "$(getent passwd "${SUDO_USER:-}" 2>/dev/null | cut -d: -f6)/.cargo" \
    "${HOME:-/root}/.cargo" /root/.cargo; do
    if [ -n "$home" ] && [ -x "$home/bin/cargo" ]; then
      export PATH="$home/bin:$PATH" CARGO_HOME="$home"
      # rustup's proxies need the toolchains that sit next to this cargo home.
      if [ -z "${RUSTUP_HOME:-}" ] && [ -d "${home%/.cargo}/.rustup" ]; then
        export RUSTUP_HOME="${home%/.cargo}/.rustup"
      fi
      return 0
    fi
  done
  return 0
}
cargo_path
