#!/bin/sh
# User-space C tests of the patches' code, built with gcc -Wall -Wextra
# -Werror:
#  - hash/ip_fw_jhash.h (the file 0003 adds; checked to be byte for byte the
#    one in the patch) against lookup3's reference values and marks captured
#    from Linux nftables (tests/jhash_test.c);
#  - 0003's lease-map code, extracted from the patch, against stubbed kernel
#    interfaces (tests/srcjhash_kernel_test.c);
#  - 0002's tcp_l2mcast_syn_ok() (IPv4 and IPv6) with 0001's in_shared.h,
#    extracted from the patches, against stubs (tests/tcp_l2mcast_test.c).
#
# usage: check-c.sh [OUTPUT_BINARY]   (default: a temporary file)
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
    -I"$here/hash" -o "$bin" "$here/tests/jhash_test.c"
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
	    -o "$scratch/srcjhash_kernel_test" "$here/tests/srcjhash_kernel_test.c"
	"$scratch/srcjhash_kernel_test"
fi

# tcp_l2mcast_syn_ok() of 0002 with in_shared.h of 0001, against stubs.
p1=
p2=
for p in "$here"/0001-*.patch; do [ -f "$p" ] && p1=$p; done
for p in "$here"/0002-*.patch; do [ -f "$p" ] && p2=$p; done
if [ -n "$p1" ] && [ -n "$p2" ]; then
	awk '/^\+\+\+ b\/sys\/netinet\/in_shared.h/ { on = 1; next }
	     on && /^diff --git/ { exit }
	     on && /^@@/ { next }
	     on { sub(/^\+/, ""); print }' "$p1" >"$scratch/in_shared.h"
	# From the comment above the helpers to the end of tcp_l2mcast_syn_ok(),
	# the IPv4 and IPv6 helpers (and their #ifdef INET/INET6) included.
	awk '/^\+ \* Shared cluster addresses:/ { on = 1; print "/*" }
	     on { line = $0; sub(/^\+/, "", line); print line }
	     on && /^\+tcp_l2mcast_syn_ok\(/ { last = 1 }
	     on && last && /^\+}$/ { exit }' "$p2" >"$scratch/tcp_l2mcast_glue.c"
	if ! grep -q '^tcp_l2mcast_syn_ok6(' "$scratch/tcp_l2mcast_glue.c" ||
	    ! grep -q '^tcp_l2mcast_syn_ok(' "$scratch/tcp_l2mcast_glue.c"; then
		echo "FAILED: tcp_l2mcast_syn_ok() and its helpers not found in $(basename "$p2")" >&2
		exit 1
	fi
	"$cc" -std=c11 -D_DEFAULT_SOURCE -O2 -Wall -Wextra -Werror \
	    -fno-strict-aliasing -I"$scratch" \
	    -o "$scratch/tcp_l2mcast_test" "$here/tests/tcp_l2mcast_test.c"
	"$scratch/tcp_l2mcast_test"
fi
