/*
 * User-space test of the kernel code patch 0003 adds to ip_fw2.c for the
 * srcjhash lease maps: the sysctl parser, the map writer and the match
 * (deadline in kernel uptime). check-c.sh extracts that code from the
 * patch into srcjhash_glue.c; the kernel interfaces it uses are stubbed
 * here, with getsbinuptime() driven by the test.
 */
#include <errno.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ip_fw_jhash.h"

/* ip_fw.h (patch 0003) */
#define	IPFW_SRCJHASH_MAPS	16
#define	IPFW_SRCJHASH_BUCKETS	4096
typedef struct { struct { uint8_t opcode, len; uint16_t arg1; } o;
    uint32_t d[2]; } ipfw_insn_u32;

/* Kernel interfaces, stubbed. */
typedef int64_t sbintime_t;
static sbintime_t test_now;
static sbintime_t getsbinuptime(void) { return (test_now); }
static sbintime_t nstosbt(uint64_t ns) { return ((sbintime_t)(ns * 4)); }
#define	__unused	__attribute__((unused))
#define	__PAST_END(a, o)	((a)[o])
#define	VNET_DEFINE_STATIC(t, n)	static t n
#define	VNET(n)			n
#define	VNET_NAME(n)		n
#define	SYSCTL_INT(...)		struct sysctl_hack
#define	SYSCTL_PROC(...)	struct sysctl_hack
#define	MALLOC_DEFINE(...)	int malloc_define_stub __attribute__((unused))
#define	SX_SYSINIT(...)		struct sx_hack
#define	VNET_SYSUNINIT(...)	struct vnet_hack
struct sx { int unused; };
#define	sx_xlock(s)	((void)(s))
#define	sx_xunlock(s)	((void)(s))
#define	M_WAITOK	1
#define	M_ZERO		2
#define	malloc(sz, t, f)	calloc(1, (sz))
#define	free(p, t)		free(p)
#define	strtouq			strtoull
#define	atomic_store_rel_64(p, v)	(*(p) = (v))
#define	atomic_load_acq_64(p)		(*(p))
#define	atomic_store_rel_ptr(p, v)	(*(p) = (v))
#define	atomic_load_acq_ptr(p)		(*(p))
struct sysctl_req { const void *newptr; size_t newlen; };
#define	SYSCTL_HANDLER_ARGS	void *oidp, void *arg1, intmax_t arg2, \
	struct sysctl_req *req
#define	SYSCTL_IN(r, buf, len)	(memcpy((buf), (r)->newptr, (len)), 0)
#define	SYSCTL_OUT(r, buf, len)	0

#include "srcjhash_glue.c"

static int failures;
#define	CHECK(cond) do { if (!(cond)) { failures++;			\
	fprintf(stderr, "FAIL line %d: %s\n", __LINE__, #cond); } } while (0)

static int
write_lease(const char *s)
{
	struct sysctl_req req = { s, strlen(s) };

	return (sysctl_ipfw_srcjhash_lease(NULL, NULL, 0, &req));
}

int
main(void)
{
	struct ipfw_srcjhash_map *m;
	ipfw_insn_u32 cmd = { { 0, 3, 3 | IPFW_JHASH_ADDR << 8 },
	    { 0x4e4c4221, 256 } };
	struct in_addr src;
	struct in6_addr src6;
	uint8_t a[4];
	uint32_t b, owned;
	int i;

	/* Parsing: a map is written whole, other buckets are not owned. */
	CHECK(write_lease("3 1000 0-3,8") == 0);
	m = V_fw_srcjhash_maps[3];
	CHECK(m != NULL);
	for (i = 0; i < IPFW_SRCJHASH_BUCKETS; i++)
		CHECK(m->deadline[i] == ((i <= 3 || i == 8) ? 4000u : 0u));
	CHECK(write_lease("3 2000 -") == 0);
	for (i = 0; i < IPFW_SRCJHASH_BUCKETS; i++)
		CHECK(m->deadline[i] == 0);
	/* Bad input is refused and changes nothing. */
	CHECK(write_lease("3 1000 5") == 0);
	CHECK(write_lease("16 1 -") == EINVAL);
	CHECK(write_lease("3 x -") == EINVAL);
	CHECK(write_lease("3 1 5-2") == EINVAL);
	CHECK(write_lease("3 1 4096") == EINVAL);
	CHECK(write_lease("3 1 1,,2") == EINVAL);
	CHECK(write_lease("3 1000") == EINVAL);
	CHECK(m->deadline[5] == 4000 && m->deadline[4] == 0);

	/* The match: find a source whose bucket is owned. */
	owned = 77;
	for (i = 0; i < 1 << 16; i++) {
		a[0] = 10; a[1] = 1; a[2] = i >> 8; a[3] = i & 0xff;
		if (ipfw_jhash_bucket(a, 4, 0, IPFW_JHASH_ADDR, cmd.d[0],
		    256) == owned)
			break;
	}
	memcpy(&src, a, 4);
	memset(&src6, 0, sizeof(src6));
	CHECK(write_lease("3 1000 77") == 0);
	test_now = 3999;
	V_fw_srcjhash_enable = 0;
	CHECK(!ipfw_srcjhash_match(&cmd, 0, src, &src6, 0, 0));	/* off */
	V_fw_srcjhash_enable = 1;
	CHECK(ipfw_srcjhash_match(&cmd, 0, src, &src6, 0, 0));
	test_now = 4000;	/* the deadline: no more new flows */
	CHECK(!ipfw_srcjhash_match(&cmd, 0, src, &src6, 0, 0));
	/* A delayed write of the same lease does not extend it. */
	CHECK(write_lease("3 1000 77") == 0);
	CHECK(!ipfw_srcjhash_match(&cmd, 0, src, &src6, 0, 0));
	/* Another source, another bucket: not owned. */
	test_now = 0;
	a[3] ^= 1;
	b = ipfw_jhash_bucket(a, 4, 0, IPFW_JHASH_ADDR, cmd.d[0], 256);
	memcpy(&src, a, 4);
	CHECK(ipfw_srcjhash_match(&cmd, 0, src, &src6, 0, 0) == (b == owned));
	/* address_port needs a port; an unwritten map matches nothing. */
	cmd.o.arg1 = 3 | IPFW_JHASH_ADDR_PORT << 8;
	CHECK(!ipfw_srcjhash_match(&cmd, 0, src, &src6, 80, 0));
	cmd.o.arg1 = 4;
	CHECK(!ipfw_srcjhash_match(&cmd, 0, src, &src6, 0, 0));
	ipfw_srcjhash_vnet_uninit(NULL);
	CHECK(V_fw_srcjhash_maps[3] == NULL);

	if (failures == 0)
		printf("ok: srcjhash lease maps (parse, write, deadline match)\n");
	return (failures != 0);
}
