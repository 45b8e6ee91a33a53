/*
 * User-space test of tcp_l2mcast_syn_ok() and its IPv4 and IPv6 helpers, the
 * functions patch 0002 adds to tcp_input.c, with in_ifa_is_shared() from
 * patch 0001's in_shared.h. check-c.sh extracts both from the patches
 * (tcp_l2mcast_glue.c, in_shared.h); the kernel types and macros they use
 * are stubbed here (the IN6_IS_ADDR_* and IN6_ARE_ADDR_EQUAL macros are the
 * C library's, with FreeBSD's meaning).
 */
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/ip6.h>
#include <arpa/inet.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#define	_KERNEL
#define	VNET_DECLARE(t, n)	extern t n
#define	VNET(n)			n
struct ifaddr { unsigned int ifa_flags; };
#include "in_shared.h"

struct ifnet { int unit; int if_flags; };
#define	IFF_LOOPBACK		0x8
static int
if_getflags(const struct ifnet *ifp)
{
	return (ifp->if_flags);
}
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
struct in6_ifaddr {
	struct ifaddr ia_ifa;
	struct ifnet *ia_ifp;
	struct sockaddr_in6 ia_addr;
	int ia6_flags;
	struct in6_ifaddr *ia6_hash;	/* next in the (single) hash chain */
};
#define	IA6_IN6(ia)		(&(ia)->ia_addr.sin6_addr)
#define	IN6_IFF_TENTATIVE	0x02
#define	IN6_IFF_DUPLICATED	0x04
#define	IN6_IFF_NOTREADY	(IN6_IFF_TENTATIVE|IN6_IFF_DUPLICATED)
static struct in6_ifaddr *hash6_head;
#define	IN6ADDR_HASH(a)		(&hash6_head)
#define	CK_LIST_FOREACH(v, head, field)					\
	for ((v) = *(head); (v) != NULL; (v) = (v)->field)
#define	INET
#define	INET6

int in_shared_addr;
static int V_tcp_accept_l2mcast;

#include "tcp_l2mcast_glue.c"

static int failures;
#define	CHECK(cond) do { if (!(cond)) { failures++;			\
	fprintf(stderr, "FAIL line %d: %s\n", __LINE__, #cond); } } while (0)

static void
set6(struct in6_addr *a, const char *text)
{
	if (inet_pton(AF_INET6, text, a) != 1) {
		fprintf(stderr, "bad address %s\n", text);
		failures++;
	}
}

/*
 * IPv6: the VIP on lo0 (the agent's recipe: the SYN arrives on the physical
 * interface, which does not hold the address), host addresses on the
 * receiving interface and on another one.
 */
static void
test_ipv6(void)
{
	struct ifnet phys = { 0, 0 }, other = { 1, 0 };
	struct ifnet lo0 = { 2, IFF_LOOPBACK };
	struct in6_ifaddr vip = { { 0 }, &lo0, { 0 }, 0, NULL };
	struct in6_ifaddr own = { { 0 }, &phys, { 0 }, 0, &vip };
	struct in6_ifaddr elsewhere = { { 0 }, &other, { 0 }, 0, &own };
	struct in6_ifaddr tentative = { { 0 }, &lo0, { 0 }, IN6_IFF_TENTATIVE,
	    &elsewhere };
	struct in6_ifaddr ll = { { 0 }, &phys, { 0 }, 0, &tentative };
	struct in6_ifaddr loop = { { 0 }, &lo0, { 0 }, 0, &ll };
	struct mbuf m = { M_MCAST, { &phys } };
	struct ip6_hdr ip6;

	set6(&vip.ia_addr.sin6_addr, "2001:db8::10");
	set6(&own.ia_addr.sin6_addr, "2001:db8::1");
	set6(&elsewhere.ia_addr.sin6_addr, "2001:db8:1::1");
	set6(&tentative.ia_addr.sin6_addr, "2001:db8::20");
	set6(&ll.ia_addr.sin6_addr, "fe80::1");
	set6(&loop.ia_addr.sin6_addr, "::1");
	hash6_head = &loop;
	hash_head = NULL;	/* an IPv6 SYN never looks at IPv4 addresses */
	memset(&ip6, 0, sizeof(ip6));
	ip6.ip6_dst = vip.ia_addr.sin6_addr;

	/* 0: stock behaviour. */
	V_tcp_accept_l2mcast = 0;
	CHECK(!tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	/*
	 * 1: no IPv6 shared flag; addresses on a loopback interface only,
	 * whatever net.inet.ip.shared_addr says.
	 */
	V_tcp_accept_l2mcast = 1;
	in_shared_addr = 0;
	CHECK(tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	in_shared_addr = 1;
	CHECK(tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	ip6.ip6_dst = own.ia_addr.sin6_addr;		/* the host's own */
	CHECK(!tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	ip6.ip6_dst = vip.ia_addr.sin6_addr;
	m.m_flags = M_BCAST | M_MCAST;			/* broadcasts: never */
	CHECK(!tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	m.m_flags = M_MCAST;
	/* 2: any local address of the receiving interface or of lo0. */
	V_tcp_accept_l2mcast = 2;
	CHECK(tcp_l2mcast_syn_ok(&m, NULL, &ip6));	/* VIP on lo0 */
	m.m_pkthdr.rcvif = &other;			/* any interface */
	CHECK(tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	m.m_pkthdr.rcvif = &phys;
	ip6.ip6_dst = own.ia_addr.sin6_addr;		/* receiving interface */
	CHECK(tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	m.m_flags = M_BCAST | M_MCAST;
	CHECK(!tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	m.m_flags = M_BCAST;
	CHECK(!tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	m.m_flags = 0;					/* not for this path */
	CHECK(!tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	m.m_flags = M_MCAST;
	ip6.ip6_dst = elsewhere.ia_addr.sin6_addr;	/* another interface */
	CHECK(!tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	set6(&ip6.ip6_dst, "2001:db8::99");		/* not local */
	CHECK(!tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	ip6.ip6_dst = tentative.ia_addr.sin6_addr;	/* not ready */
	CHECK(!tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	tentative.ia6_flags = IN6_IFF_DUPLICATED;
	CHECK(!tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	tentative.ia6_flags = 0;			/* ready now */
	CHECK(tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	ip6.ip6_dst = ll.ia_addr.sin6_addr;		/* link-local */
	CHECK(!tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	ip6.ip6_dst = loop.ia_addr.sin6_addr;		/* ::1 */
	CHECK(!tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	set6(&ip6.ip6_dst, "ff05::1");			/* multicast */
	CHECK(!tcp_l2mcast_syn_ok(&m, NULL, &ip6));
	/* An IPv4 SYN is unchanged by IPv6 addresses. */
	CHECK(!tcp_l2mcast_syn_ok(&m, NULL, NULL));
}

int
main(void)
{
	struct ifnet if0 = { 0, 0 }, if1 = { 1, 0 };
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
	CHECK(!tcp_l2mcast_syn_ok(&m, &ip, NULL));
	/* 1: only flagged addresses, and only while the flag is honoured. */
	V_tcp_accept_l2mcast = 1;
	CHECK(!tcp_l2mcast_syn_ok(&m, &ip, NULL));
	vip.ia_ifa.ifa_flags |= IFA_SHARED;
	CHECK(!tcp_l2mcast_syn_ok(&m, &ip, NULL));		/* shared_addr=0 */
	in_shared_addr = 1;
	CHECK(tcp_l2mcast_syn_ok(&m, &ip, NULL));
	CHECK(!tcp_l2mcast_syn_ok(&m, NULL, NULL));
	m.m_flags = M_BCAST | M_MCAST;			/* broadcasts: never */
	CHECK(!tcp_l2mcast_syn_ok(&m, &ip, NULL));
	m.m_flags = M_MCAST;
	m.m_pkthdr.rcvif = &if1;			/* another interface */
	CHECK(!tcp_l2mcast_syn_ok(&m, &ip, NULL));
	m.m_pkthdr.rcvif = &if0;
	ip.ip_dst = plain.ia_addr.sin_addr;		/* local, not shared */
	CHECK(!tcp_l2mcast_syn_ok(&m, &ip, NULL));
	/* 2: any local address of the receiving interface. */
	V_tcp_accept_l2mcast = 2;
	CHECK(tcp_l2mcast_syn_ok(&m, &ip, NULL));
	ip.ip_dst.s_addr = htonl(0xc0000263);		/* not local */
	CHECK(!tcp_l2mcast_syn_ok(&m, &ip, NULL));

	test_ipv6();

	if (failures == 0)
		printf("ok: tcp_l2mcast_syn_ok (IPv4: modes 0/1/2, flag, "
		    "broadcast, interface; IPv6: modes 0/1/2, lo0 and receiving "
		    "interface, broadcast, scope, not ready)\n");
	return (failures != 0);
}
