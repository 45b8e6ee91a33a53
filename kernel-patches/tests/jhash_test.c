/*
 * User-space test of ip_fw_jhash.h, the bucket function of the ipfw
 * O_SRCJHASH opcode (kernel-patches/0003). Built on Linux with
 * gcc -Wall -Wextra -Werror by check-c.sh.
 *
 *   jhash_test            self-test: lookup3 reference values and marks the
 *                         Linux kernel computed (core/src/bucket.rs)
 *   jhash_test --stdin    reads "AFFINITY SEED MODULUS ADDRESS PORT" lines
 *                         (affinity address|network24|address_port, seed and
 *                         modulus in C notation, port 0 when unused) and
 *                         prints one bucket per line, for the Rust comparison
 *                         in node-agent/tests/freebsd_jhash.rs
 */
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ip_fw_jhash.h"

struct vector {
	uint32_t seed;
	uint32_t affinity;
	const char *addr;
	uint16_t port;
	uint32_t mark;	/* reciprocal_scale(jhash, 0xffffffff), from Linux 6.18 */
};

/* core/src/bucket.rs KERNEL_VECTORS, captured by core/tests/bucket.rs. */
static const struct vector kernel_vectors[] = {
	{ 0x4e4c4221, IPFW_JHASH_ADDR, "10.185.113.188", 0, 0x0051942a },
	{ 0x4e4c4221, IPFW_JHASH_ADDR, "10.44.248.216", 0, 0x86115452 },
	{ 0x4e4c4221, IPFW_JHASH_ADDR, "10.5.215.83", 0, 0xff94d39d },
	{ 0x4e4c4221, IPFW_JHASH_ADDR_PORT, "10.160.17.7", 13590, 0x00067c0a },
	{ 0x4e4c4221, IPFW_JHASH_ADDR_PORT, "10.12.236.80", 59523, 0x8227df58 },
	{ 0x4e4c4221, IPFW_JHASH_ADDR_PORT, "10.19.147.254", 23100, 0xffecfc39 },
	{ 0x9e3779b9, IPFW_JHASH_ADDR, "10.10.34.171", 0, 0x00088674 },
	{ 0x9e3779b9, IPFW_JHASH_ADDR, "10.149.112.100", 0, 0x7b18cecf },
	{ 0x9e3779b9, IPFW_JHASH_ADDR, "10.23.24.94", 0, 0xfea683ad },
	{ 0x9e3779b9, IPFW_JHASH_ADDR_PORT, "10.50.219.30", 42131, 0x002df0f6 },
	{ 0x9e3779b9, IPFW_JHASH_ADDR_PORT, "10.184.169.15", 53578, 0x7f4cf7df },
	{ 0x9e3779b9, IPFW_JHASH_ADDR_PORT, "10.199.242.242", 10760, 0xff476c40 },
	{ 0x9e3779b9, IPFW_JHASH_NET, "10.30.66.174", 0, 0x0016d866 },
	{ 0x9e3779b9, IPFW_JHASH_NET, "10.173.113.190", 0, 0x7def8fc7 },
	{ 0x9e3779b9, IPFW_JHASH_NET, "10.227.212.159", 0, 0xffbd9895 },
	{ 0x4e4c4221, IPFW_JHASH_ADDR, "fd00:8aa3:ece:ff43:ac78:d173:9ce5:253a", 0, 0x0008bcf4 },
	{ 0x4e4c4221, IPFW_JHASH_ADDR, "fd00:775e:bf14:f43f:3c3:96e8:aba0:8fc6", 0, 0x70cd0845 },
	{ 0x4e4c4221, IPFW_JHASH_ADDR, "fd00:cccc:e27f:461a:fbd0:c2cf:2201:d554", 0, 0xfe46c842 },
	{ 0x4e4c4221, IPFW_JHASH_ADDR_PORT, "fd00:125a:e91d:1d57:a615:6bba:f90d:1894", 32306, 0x01630bc5 },
	{ 0x4e4c4221, IPFW_JHASH_ADDR_PORT, "fd00:f1b8:7710:119f:bd43:5334:a1e1:b78a", 46649, 0x7f69b416 },
	{ 0x4e4c4221, IPFW_JHASH_ADDR_PORT, "fd00:5e80:bfd3:6bfa:c864:44d4:8b97:7146", 62552, 0xffb2bd54 },
	{ 0x9e3779b9, IPFW_JHASH_ADDR, "fd00:e75d:ec92:f91:86c3:d250:8a89:f171", 0, 0x0102b113 },
	{ 0x9e3779b9, IPFW_JHASH_ADDR, "fd00:a2e:ef98:c85c:667d:2787:6387:cd09", 0, 0x8116c2d7 },
	{ 0x9e3779b9, IPFW_JHASH_ADDR, "fd00:9ddb:b276:164c:27f0:87ff:eb68:39af", 0, 0xff2a8800 },
	{ 0x9e3779b9, IPFW_JHASH_ADDR_PORT, "fd00:96c6:d72b:ee44:cd65:1f49:1f93:7527", 58645, 0x011fb7b2 },
	{ 0x9e3779b9, IPFW_JHASH_ADDR_PORT, "fd00:b37d:2401:628c:3dfc:b0b9:c10d:22c8", 36965, 0x87e82e66 },
	{ 0x9e3779b9, IPFW_JHASH_ADDR_PORT, "fd00:c54a:a2b:7e84:825c:21ac:a446:33f1", 64477, 0xff9a0476 },
	{ 0x9e3779b9, IPFW_JHASH_NET, "fd00:a654:984e:3dc1:562b:3119:2c8b:6c6c", 0, 0x011e29e1 },
	{ 0x9e3779b9, IPFW_JHASH_NET, "fd00:c423:2685:3476:5bce:3af7:33a6:71d7", 0, 0x79723016 },
	{ 0x9e3779b9, IPFW_JHASH_NET, "fd00:778d:4178:9181:b7a3:e6ab:b306:d629", 0, 0xffd496cc },
};

/* Parses an address into network-order bytes; returns its length or 0. */
static uint32_t
parse_addr(const char *s, uint8_t *out)
{

	if (inet_pton(AF_INET, s, out) == 1)
		return (4);
	if (inet_pton(AF_INET6, s, out) == 1)
		return (16);
	return (0);
}

static int
self_test(void)
{
	static const char four_score[] = "Four score and seven years ago";
	uint8_t addr[16];
	uint32_t alen, got;
	size_t i;
	int failed = 0;

	/* Bob Jenkins' lookup3.c driver5 values. */
	if (ipfw_jhash((const uint8_t *)"", 0, 0) != 0xdeadbeef ||
	    ipfw_jhash((const uint8_t *)four_score, 30, 0) != 0x17770551 ||
	    ipfw_jhash((const uint8_t *)four_score, 30, 1) != 0xcd628161) {
		fprintf(stderr, "FAIL: lookup3 reference values\n");
		failed = 1;
	}
	for (i = 0; i < sizeof(kernel_vectors) / sizeof(kernel_vectors[0]); i++) {
		const struct vector *v = &kernel_vectors[i];

		alen = parse_addr(v->addr, addr);
		if (alen == 0) {
			fprintf(stderr, "FAIL: bad address %s\n", v->addr);
			return (1);
		}
		got = ipfw_jhash_bucket(addr, alen, v->port, v->affinity,
		    v->seed, 0xffffffffU);
		if (got != v->mark) {
			fprintf(stderr, "FAIL: %s port %u affinity %u seed %#x: "
			    "%#010x, Linux %#010x\n", v->addr, v->port,
			    v->affinity, v->seed, got, v->mark);
			failed = 1;
		}
	}
	if (!failed)
		printf("ok: lookup3 reference values and %zu Linux kernel "
		    "vectors\n", i);
	return (failed);
}

static int
parse_affinity(const char *s, uint32_t *out)
{

	if (strcmp(s, "address") == 0)
		*out = IPFW_JHASH_ADDR;
	else if (strcmp(s, "network24") == 0)
		*out = IPFW_JHASH_NET;
	else if (strcmp(s, "address_port") == 0)
		*out = IPFW_JHASH_ADDR_PORT;
	else
		return (-1);
	return (0);
}

static int
from_stdin(void)
{
	char line[256], aff[32], seed[32], mod[32], addr_s[64];
	uint8_t addr[16];
	unsigned port;
	unsigned long lineno = 0;
	uint32_t affinity, alen;

	while (fgets(line, sizeof(line), stdin) != NULL) {
		lineno++;
		if (sscanf(line, "%31s %31s %31s %63s %u", aff, seed, mod,
		    addr_s, &port) != 5 || parse_affinity(aff, &affinity) != 0 ||
		    port > 65535 || (alen = parse_addr(addr_s, addr)) == 0) {
			fprintf(stderr, "stdin line %lu: expected \"AFFINITY SEED "
			    "MODULUS ADDRESS PORT\", got: %s", lineno, line);
			return (1);
		}
		printf("%u\n", ipfw_jhash_bucket(addr, alen, (uint16_t)port,
		    affinity, (uint32_t)strtoul(seed, NULL, 0),
		    (uint32_t)strtoul(mod, NULL, 0)));
	}
	return (ferror(stdin) ? 1 : 0);
}

int
main(int argc, char **argv)
{

	if (argc == 2 && strcmp(argv[1], "--stdin") == 0)
		return (from_stdin());
	if (argc != 1) {
		fprintf(stderr, "usage: %s [--stdin]\n", argv[0]);
		return (2);
	}
	return (self_test());
}
