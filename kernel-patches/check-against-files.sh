#!/bin/sh
# Checks that every kernel patch applies, in order, to a directory holding
# the files it touches (a partial FreeBSD tree reconstructed from known
# revisions, or a real tree). Works on a copy in a scratch git repository;
# the given directory is not modified.
#
# usage: check-against-files.sh DIR [PATCH...]
#   DIR      contains e.g. sys/netinet/tcp_input.c at the recorded revision
#   PATCH    default: every *.patch next to this script, in name order
set -eu

here=$(cd "$(dirname "$0")" && pwd)
if [ $# -lt 1 ] || [ ! -d "$1" ]; then
	echo "usage: $0 DIR [PATCH...]" >&2
	exit 2
fi
src=$(cd "$1" && pwd)
shift
if [ $# -eq 0 ]; then
	set -- "$here"/*.patch
fi
# Absolute patch paths: the checks run in a scratch directory.
for p in "$@"; do
	shift
	set -- "$@" "$(cd "$(dirname "$p")" && pwd)/$(basename "$p")"
done

scratch=$(mktemp -d "${TMPDIR:-/tmp}/vipshare-patchcheck.XXXXXX")
trap 'rm -rf "$scratch"' EXIT INT TERM
cp -R "$src"/. "$scratch"/
cd "$scratch"
git init -q .
git add -A
git -c user.name=check -c user.email=check@localhost commit -q -m base

status=0
for p in "$@"; do
	name=$(basename "$p")
	if git apply --check "$p" 2>"$scratch/.err"; then
		git apply "$p"
		echo "ok      $name"
	else
		echo "FAILED  $name"
		sed 's/^/        /' "$scratch/.err"
		status=1
	fi
done
exit "$status"
