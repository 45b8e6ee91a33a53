#!/bin/sh
# Builds the user-space test of the ipfw O_SRCJHASH bucket function
# (hash/ip_fw_jhash.h, the file patch 0003 adds to the kernel) with
# gcc -Wall -Wextra -Werror and runs its self-test against the Linux kernel's
# vectors. Also checks that the header in the patch is byte for byte
# hash/ip_fw_jhash.h, so the test covers the code the kernel would build, and
# tests the patch's lease-map code (hash/srcjhash_kernel_test.c).
#
# usage: check-hash.sh [OUTPUT_BINARY]   (default: a temporary file)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
cc=${CC:-gcc}
scratch=$(mktemp -d "${TMPDIR:-/tmp}/vipshare-jhash.XXXXXX")
trap 'rm -rf "$scratch"' EXIT INT TERM
bin=${1:-$scratch/jhash_test}

patch=
for p in "$here"/0003-*.patch; do
	[ -f "$p" ] && patch=$p
done
if [ -n "$patch" ]; then
	# The new file's hunk: every '+' line after its header, '+' removed.
	awk '/^\+\+\+ b\/sys\/netpfil\/ipfw\/ip_fw_jhash.h/ { on = 1; next }
	     on && /^diff --git/ { exit }
	     on && /^@@/ { next }
	     on { sub(/^\+/, ""); print }' "$patch" >"$scratch/from-patch.h"
	if ! cmp -s "$scratch/from-patch.h" "$here/hash/ip_fw_jhash.h"; then
		echo "FAILED: ip_fw_jhash.h in $(basename "$patch") differs from hash/ip_fw_jhash.h" >&2
		diff -u "$here/hash/ip_fw_jhash.h" "$scratch/from-patch.h" >&2 || true
		exit 1
	fi
	echo "ok      ip_fw_jhash.h in $(basename "$patch") is hash/ip_fw_jhash.h"
fi

"$cc" -std=c99 -D_DEFAULT_SOURCE -O2 -Wall -Wextra -Werror -pedantic \
    -o "$bin" "$here/hash/jhash_test.c"
"$bin"

# The lease-map code 0003 adds to ip_fw2.c, from its comment to the end of
# ipfw_srcjhash_match(), against stubbed kernel interfaces.
if [ -n "$patch" ]; then
	awk '/^\+ \* O_SRCJHASH: per-bucket leases/ { on = 1; print "/*" }
	     on { line = $0; sub(/^\+/, "", line); print line }
	     on && /^\+ipfw_srcjhash_match\(/ { last = 1 }
	     on && last && /^\+}$/ { exit }' "$patch" >"$scratch/srcjhash_glue.c"
	# As the kernel is built: no strict aliasing, unused parameters allowed.
	"$cc" -std=c11 -D_DEFAULT_SOURCE -O2 -Wall -Wextra -Werror \
	    -fno-strict-aliasing -Wno-unused-parameter -I"$here/hash" -I"$scratch" \
	    -o "$scratch/srcjhash_kernel_test" "$here/hash/srcjhash_kernel_test.c"
	"$scratch/srcjhash_kernel_test"
fi
