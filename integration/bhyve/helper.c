/*
 * Guest-side helper of the bhyve harness (compiled in the VM by
 * guest-test.sh with the base system's cc):
 *   helper add-shared IF ADDR/LEN   add ADDR with the shared-address flag of
 *                                   kernel-patches/0001 (SIOCAIFADDR with
 *                                   IN_AIFADDR_SHARED in ifra_vhid)
 *   helper uptime-ns                CLOCK_UPTIME in ns (the clock of the
 *                                   srcjhash lease deadlines, 0003)
 *   helper bucket SEED B ADDR       the jhash bucket of an IPv4 source, by the
 *                                   kernel's own ip_fw_jhash.h
 */
#include <sys/types.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/sockio.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/in_var.h>
#include <arpa/inet.h>

#include <err.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include "ip_fw_jhash.h"

#define	IN_AIFADDR_SHARED	0x40000000	/* netinet/in_shared.h (0001) */

static int
add_shared(const char *ifname, char *spec)
{
	struct in_aliasreq req;
	char *slash;
	long len;
	int s;

	slash = strchr(spec, '/');
	if (slash == NULL)
		errx(EX_USAGE, "%s: expected ADDR/LEN", spec);
	*slash = '\0';
	len = strtol(slash + 1, NULL, 10);
	if (len < 1 || len > 32)
		errx(EX_USAGE, "prefix length %s is not in 1..32", slash + 1);
	memset(&req, 0, sizeof(req));
	strlcpy(req.ifra_name, ifname, sizeof(req.ifra_name));
	req.ifra_addr.sin_len = sizeof(struct sockaddr_in);
	req.ifra_addr.sin_family = AF_INET;
	if (inet_pton(AF_INET, spec, &req.ifra_addr.sin_addr) != 1)
		errx(EX_USAGE, "%s: not an IPv4 address", spec);
	req.ifra_mask.sin_len = sizeof(struct sockaddr_in);
	req.ifra_mask.sin_family = AF_INET;
	req.ifra_mask.sin_addr.s_addr = htonl(0xffffffffU << (32 - len));
	req.ifra_vhid = IN_AIFADDR_SHARED;
	if ((s = socket(AF_INET, SOCK_DGRAM, 0)) < 0)
		err(EX_OSERR, "socket");
	if (ioctl(s, SIOCAIFADDR, &req) < 0)
		err(EX_OSERR, "SIOCAIFADDR %s %s/%ld shared (is "
		    "net.inet.ip.shared_addr 1?)", ifname, spec, len);
	close(s);
	return (0);
}

int
main(int argc, char **argv)
{
	struct timespec ts;
	struct in_addr a;

	if (argc == 4 && strcmp(argv[1], "add-shared") == 0)
		return (add_shared(argv[2], argv[3]));
	if (argc == 2 && strcmp(argv[1], "uptime-ns") == 0) {
		if (clock_gettime(CLOCK_UPTIME, &ts) != 0)
			err(EX_OSERR, "clock_gettime");
		printf("%jd\n", (intmax_t)ts.tv_sec * 1000000000 + ts.tv_nsec);
		return (0);
	}
	if (argc == 5 && strcmp(argv[1], "bucket") == 0) {
		if (inet_pton(AF_INET, argv[4], &a) != 1)
			errx(EX_USAGE, "%s: not an IPv4 address", argv[4]);
		printf("%u\n", ipfw_jhash_bucket((const uint8_t *)&a, 4, 0,
		    IPFW_JHASH_ADDR, (uint32_t)strtoul(argv[2], NULL, 0),
		    (uint32_t)strtoul(argv[3], NULL, 0)));
		return (0);
	}
	fprintf(stderr, "usage: %s add-shared IF ADDR/LEN | uptime-ns | "
	    "bucket SEED B ADDR\n", argv[0]);
	return (EX_USAGE);
}
