/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * Source-address bucket of Linux nftables' `jhash <key> mod B seed S`
 * (net/netfilter/nft_hash.c: reciprocal_scale(jhash(key, len, S), B)), so
 * ipfw hosts and nftables hosts of one cluster agree on every bucket.
 *
 * jhash is Bob Jenkins' lookup3 hashlittle() as in Linux include/linux/jhash.h.
 * Linux reads full 12-byte blocks in CPU order; this reads them little-endian
 * on every CPU, which equals Linux on little-endian hosts (amd64, arm64) and
 * for every key of at most 12 bytes (all IPv4 keys) everywhere.
 *
 * The key is what nftables puts in its registers: each field padded with
 * zeros to 4 bytes, addresses in network order, the port in network order.
 */
#ifndef _IP_FW_JHASH_H_
#define _IP_FW_JHASH_H_

#define	IPFW_JHASH_INITVAL	0xdeadbeefU

/* Affinities (what the key is); numbers are userland ABI (O_SRCJHASH). */
#define	IPFW_JHASH_ADDR		0	/* source address */
#define	IPFW_JHASH_NET		1	/* IPv4 /24, IPv6 /64 */
#define	IPFW_JHASH_ADDR_PORT	2	/* source address . source port */

#define	IPFW_JHASH_KEYMAX	20	/* IPv6 address + padded port */

#define	ipfw_jhash_rol32(w, s)	(((w) << (s)) | ((w) >> (32 - (s))))

#define	ipfw_jhash_mix(a, b, c) do {					\
	a -= c; a ^= ipfw_jhash_rol32(c, 4); c += b;			\
	b -= a; b ^= ipfw_jhash_rol32(a, 6); a += c;			\
	c -= b; c ^= ipfw_jhash_rol32(b, 8); b += a;			\
	a -= c; a ^= ipfw_jhash_rol32(c, 16); c += b;			\
	b -= a; b ^= ipfw_jhash_rol32(a, 19); a += c;			\
	c -= b; c ^= ipfw_jhash_rol32(b, 4); b += a;			\
} while (0)

#define	ipfw_jhash_final(a, b, c) do {					\
	c ^= b; c -= ipfw_jhash_rol32(b, 14);				\
	a ^= c; a -= ipfw_jhash_rol32(c, 11);				\
	b ^= a; b -= ipfw_jhash_rol32(a, 25);				\
	c ^= b; c -= ipfw_jhash_rol32(b, 16);				\
	a ^= c; a -= ipfw_jhash_rol32(c, 4);				\
	b ^= a; b -= ipfw_jhash_rol32(a, 14);				\
	c ^= b; c -= ipfw_jhash_rol32(b, 24);				\
} while (0)

static inline uint32_t
ipfw_jhash_le32(const uint8_t *p)
{

	return ((uint32_t)p[0] | (uint32_t)p[1] << 8 |
	    (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
}

static inline uint32_t
ipfw_jhash(const uint8_t *k, uint32_t length, uint32_t initval)
{
	uint8_t tail[12];
	uint32_t a, b, c, i;

	a = b = c = IPFW_JHASH_INITVAL + length + initval;
	while (length > 12) {
		a += ipfw_jhash_le32(k);
		b += ipfw_jhash_le32(k + 4);
		c += ipfw_jhash_le32(k + 8);
		ipfw_jhash_mix(a, b, c);
		length -= 12;
		k += 12;
	}
	if (length == 0)
		return (c);
	/* Linux adds the last 1..12 bytes one by one: a zero-padded block. */
	for (i = 0; i < 12; i++)
		tail[i] = i < length ? k[i] : 0;
	a += ipfw_jhash_le32(tail);
	b += ipfw_jhash_le32(tail + 4);
	c += ipfw_jhash_le32(tail + 8);
	ipfw_jhash_final(a, b, c);
	return (c);
}

/* Linux reciprocal_scale(): maps a hash onto 0..n-1 as (hash * n) >> 32. */
static inline uint32_t
ipfw_jhash_scale(uint32_t hash, uint32_t n)
{

	return ((uint32_t)(((uint64_t)hash * n) >> 32));
}

/*
 * Writes nft's key for a source address (network order, alen 4 or 16) and
 * source port (host order) into key[IPFW_JHASH_KEYMAX]; returns its length,
 * or 0 for an unknown affinity.
 */
static inline uint32_t
ipfw_jhash_key(uint8_t *key, const uint8_t *addr, uint32_t alen,
    uint16_t port, uint32_t affinity)
{
	uint32_t i;

	for (i = 0; i < alen; i++)
		key[i] = addr[i];
	switch (affinity) {
	case IPFW_JHASH_ADDR:
		return (alen);
	case IPFW_JHASH_NET:
		/* IPv4: the /24; IPv6: the /64. */
		for (i = (alen == 4 ? 3 : 8); i < alen; i++)
			key[i] = 0;
		return (alen);
	case IPFW_JHASH_ADDR_PORT:
		key[alen] = port >> 8;
		key[alen + 1] = port & 0xff;
		key[alen + 2] = 0;
		key[alen + 3] = 0;
		return (alen + 4);
	default:
		return (0);
	}
}

/* The bucket (0..nbuckets-1) of a source; nbuckets is 2..4096. */
static inline uint32_t
ipfw_jhash_bucket(const uint8_t *addr, uint32_t alen, uint16_t port,
    uint32_t affinity, uint32_t seed, uint32_t nbuckets)
{
	uint8_t key[IPFW_JHASH_KEYMAX];
	uint32_t len;

	len = ipfw_jhash_key(key, addr, alen, port, affinity);
	return (ipfw_jhash_scale(ipfw_jhash(key, len, seed), nbuckets));
}

#endif /* _IP_FW_JHASH_H_ */
