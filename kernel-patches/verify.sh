#!/bin/sh
# Applies the vipshare kernel patches to a FreeBSD source tree (in a scratch
# copy or git worktree, never in place) and builds a kernel with them.
#
# usage: verify.sh [--no-build] [SRC_TREE]
#
# Without a FreeBSD source tree (no argument, or a directory without
# sys/conf/newvers.sh) it prints "skipped" and exits 0: CI machines run Linux
# and have no FreeBSD sources.
#
# Build: on FreeBSD `make buildkernel KERNCONF=${KERNCONF:-GENERIC}`; on other
# systems tools/build/make.py with the LLVM tools in ${CROSS_BINDIR:-
# /usr/lib/llvm-19/bin} (kernel-toolchain first). Objects go to
# ${MAKEOBJDIRPREFIX:-<scratch>/obj}. Set KEEP=1 to keep the scratch tree.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
build=1
if [ "${1:-}" = "--no-build" ]; then
	build=0
	shift
fi
tree=${1:-}

if [ -z "$tree" ] || [ ! -f "$tree/sys/conf/newvers.sh" ]; then
	echo "skipped: no FreeBSD source tree given (usage: $0 [--no-build] SRC_TREE)"
	exit 0
fi
tree=$(cd "$tree" && pwd)
echo "source tree: $tree ($(sh "$tree/sys/conf/newvers.sh" -v 2>/dev/null | sed -n 's/^RELEASE=//p' | tr -d '"'))"
if git -C "$tree" rev-parse --verify HEAD >/dev/null 2>&1; then
	echo "revision:    $(git -C "$tree" rev-parse HEAD) ($(git -C "$tree" rev-parse --abbrev-ref HEAD))"
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/vipshare-verify.XXXXXX")
work="$scratch/src"
cleanup() {
	if [ "${KEEP:-0}" = 1 ]; then
		echo "kept: $scratch"
		return
	fi
	if git -C "$tree" worktree list 2>/dev/null | grep -q "$work"; then
		git -C "$tree" worktree remove --force "$work" || true
	fi
	rm -rf "$scratch"
}
trap cleanup EXIT INT TERM

if git -C "$tree" rev-parse --verify HEAD >/dev/null 2>&1; then
	git -C "$tree" worktree add -q --detach "$work" HEAD
else
	mkdir -p "$work"
	cp -R "$tree"/. "$work"/
	git -C "$work" init -q
fi

for p in "$here"/*.patch; do
	name=$(basename "$p")
	if ! git -C "$work" apply --check "$p"; then
		echo "FAILED: $name does not apply"
		exit 1
	fi
	git -C "$work" apply "$p"
	echo "applied: $name"
done

if [ "$build" = 0 ]; then
	echo "build: skipped (--no-build)"
	exit 0
fi

jobs=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
kernconf=${KERNCONF:-GENERIC}
export MAKEOBJDIRPREFIX="${MAKEOBJDIRPREFIX:-$scratch/obj}"
mkdir -p "$MAKEOBJDIRPREFIX"
cd "$work"
if [ "$(uname -s)" = FreeBSD ]; then
	make -j"$jobs" buildkernel KERNCONF="$kernconf"
else
	bindir=${CROSS_BINDIR:-/usr/lib/llvm-19/bin}
	if [ ! -x "$bindir/clang" ]; then
		echo "FAILED: no clang in $bindir (apt-get install clang-19 lld-19 llvm-19 libarchive-dev libbz2-dev)"
		exit 1
	fi
	tools/build/make.py --cross-bindir="$bindir" --no-clean \
	    TARGET=amd64 TARGET_ARCH=amd64 -j"$jobs" kernel-toolchain
	tools/build/make.py --cross-bindir="$bindir" --no-clean \
	    TARGET=amd64 TARGET_ARCH=amd64 -j"$jobs" \
	    KERNCONF="$kernconf" NO_MODULES=yes buildkernel
fi
echo "build: ok (KERNCONF=$kernconf)"
