#!/bin/sh
# The kernel-patch checks of scripts/test.sh:
#  1. every patch applies (git apply --check, in order) to the stored texts
#     of freebsd/freebsd-src named in README.md, after checking that the texts
#     are the recorded ones (texts.sha256);
#  2. the srcjhash hash in C builds with gcc -Wall -Wextra -Werror and gives
#     Linux's marks (check-c.sh).
#
# The texts are verbatim excerpts of public FreeBSD files and are not
# committed (this project commits no fetched source); they live in
# ${VIPSHARE_FREEBSD_TEXTS:-kernel-patches/upstream/texts}. Without
# them step 1 prints "skipped" (and fails if VIPSHARE_REQUIRE_FREEBSD_TEXTS=1).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
texts=${VIPSHARE_FREEBSD_TEXTS:-$here/upstream/texts}

if [ -d "$texts" ]; then
	(cd "$texts" && sha256sum --quiet -c "$here/texts.sha256")
	"$here/check-against-files.sh" "$texts"
elif [ "${VIPSHARE_REQUIRE_FREEBSD_TEXTS:-0}" = 1 ]; then
	echo "FAILED: no FreeBSD texts in $texts (see kernel-patches/README.md)" >&2
	exit 1
else
	echo "skipped: git apply --check (no FreeBSD texts in $texts; see kernel-patches/README.md)"
fi
"$here/check-c.sh"
