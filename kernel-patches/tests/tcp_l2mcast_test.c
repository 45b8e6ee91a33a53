/*
 * User-space test of tcp_l2mcast_syn_ok(), the function patch 0002 adds to
 * tcp_input.c, with in_ifa_is_shared() from patch 0001's in_shared.h.
 * check-c.sh extracts both from the patches (tcp_l2mcast_glue.c,
 * in_shared.h); the kernel types and macros they use are stubbed here.
 */
#include <netinet/in.h>
#include <netinet/ip.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#define	_KERNEL
#define	VNET_DECLARE(t, n)	extern t n
#define	VNET(n)			n
struct ifaddr { unsigned int ifa_flags; };
#include "in_shared.h"

struct ifnet { int unit; };
struct in_ifaddr {
	struct ifaddr ia_ifa;
	struct ifnet *ia_ifp;
	struct sockaddr_in ia_addr;
	struct in_ifaddr *ia_hash;	/* next in the (single) hash chain */
};
struct mbuf { int m_flags; struct { struct ifnet *rcvif; } m_pkthdr; };
#define	M_BCAST			0x0200
#define	M_MCAST			0x0400
#define	NET_EPOCH_ASSERT()	((void)0)
#define	IA_SIN(ia)		(&(ia)->ia_addr)
static struct in_ifaddr *hash_head;
#define	INADDR_HASH(a)		(&hash_head)
#define	CK_LIST_FOREACH(v, head, field)					\
	for ((v) = *(head); (v) != NULL; (v) = (v)->field)
#define	INET

int in_shared_addr;
static int V_tcp_accept_l2mcast;

#include "tcp_l2mcast_glue.c"

static int failures;
#define	CHECK(cond) do { if (!(cond)) { failures++;			\
	fprintf(stderr, "FAIL line %d: %s\n", __LINE__, #cond); } } while (0)

int
main(void)
{
	struct ifnet if0 = { 0 }, if1 = { 1 };
	struct in_ifaddr vip = { { 0 }, &if0, { 0 }, NULL };
	struct in_ifaddr plain = { { 0 }, &if0, { 0 }, &vip };
	struct mbuf m = { M_MCAST, { &if0 } };
	struct ip ip;

	vip.ia_addr.sin_addr.s_addr = htonl(0xc000020a);	/* 192.0.2.10 */
	plain.ia_addr.sin_addr.s_addr = htonl(0xc0000201);	/* 192.0.2.1 */
	hash_head = &plain;
	memset(&ip, 0, sizeof(ip));
	ip.ip_dst = vip.ia_addr.sin_addr;

	/* 0: stock behaviour. */
	CHECK(!tcp_l2mcast_syn_ok(&m, &ip));
	/* 1: only flagged addresses, and only while the flag is honoured. */
	V_tcp_accept_l2mcast = 1;
	CHECK(!tcp_l2mcast_syn_ok(&m, &ip));
	vip.ia_ifa.ifa_flags |= IFA_SHARED;
	CHECK(!tcp_l2mcast_syn_ok(&m, &ip));		/* shared_addr=0 */
	in_shared_addr = 1;
	CHECK(tcp_l2mcast_syn_ok(&m, &ip));
	CHECK(!tcp_l2mcast_syn_ok(&m, NULL));
	m.m_flags = M_BCAST | M_MCAST;			/* broadcasts: never */
	CHECK(!tcp_l2mcast_syn_ok(&m, &ip));
	m.m_flags = M_MCAST;
	m.m_pkthdr.rcvif = &if1;			/* another interface */
	CHECK(!tcp_l2mcast_syn_ok(&m, &ip));
	m.m_pkthdr.rcvif = &if0;
	ip.ip_dst = plain.ia_addr.sin_addr;		/* local, not shared */
	CHECK(!tcp_l2mcast_syn_ok(&m, &ip));
	/* 2: any local address of the receiving interface. */
	V_tcp_accept_l2mcast = 2;
	CHECK(tcp_l2mcast_syn_ok(&m, &ip));
	ip.ip_dst.s_addr = htonl(0xc0000263);		/* not local */
	CHECK(!tcp_l2mcast_syn_ok(&m, &ip));

	if (failures == 0)
		printf("ok: tcp_l2mcast_syn_ok (modes 0/1/2, flag, broadcast, "
		    "interface)\n");
	return (failures != 0);
}
