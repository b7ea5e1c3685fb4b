/* Load for tools/bench/datapath.py, built by it with gcc (make bench-deps): small UDP
 * datagrams as fast as one core sends them (sendmmsg), a sink that counts them
 * (recvmmsg), and a request/response pair that times each round trip.
 *
 *   udp_load flood DST PORT SIZE SECONDS      -> "sent N"
 *   udp_load sink PORT SECONDS                -> "received N first_ns last_ns"
 *   udp_load rr-server PORT SECONDS
 *   udp_load rr-client DST PORT SIZE COUNT    -> "rtt_ns v1 v2 ..." (sorted)
 *
 * Every mode stops by itself (SECONDS, or a 1 s receive timeout per exchange).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int udp_socket(void)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0), big = 4 << 20;

	if (fd < 0) {
		perror("socket");
		exit(2);
	}
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
	setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
	return fd;
}

static void bind_port(int fd, int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };

	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		perror("bind");
		exit(2);
	}
}

static void set_timeout(int fd, long usec)
{
	struct timeval tv = { .tv_sec = usec / 1000000, .tv_usec = usec % 1000000 };

	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

static struct sockaddr_in peer(const char *ip, int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };

	if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
		fprintf(stderr, "udp_load: bad address %s\n", ip);
		exit(2);
	}
	return a;
}

static int flood(const char *ip, int port, int size, double seconds)
{
	int fd = udp_socket();
	struct sockaddr_in to = peer(ip, port);
	static char buf[BATCH][2048];
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	long long end = now_ns() + (long long)(seconds * 1e9), sent = 0, seq = 0;

	if (connect(fd, (struct sockaddr *)&to, sizeof(to)) < 0) {
		perror("connect");
		return 2;
	}
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < BATCH; i++) {
		iov[i].iov_base = buf[i];
		iov[i].iov_len = size;
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	while (now_ns() < end) {
		for (int i = 0; i < BATCH; i++)  /* distinct payloads: distinct pkt_ids */
			memcpy(buf[i], &(long long){ seq++ }, sizeof(long long));
		int n = sendmmsg(fd, msgs, BATCH, 0);
		if (n > 0)
			sent += n;
		else if (errno != ENOBUFS && errno != EAGAIN && errno != ECONNREFUSED) {
			perror("sendmmsg");
			return 2;
		}
	}
	printf("sent %lld\n", sent);
	return 0;
}

static int sink(int port, double seconds)
{
	int fd = udp_socket();
	static char buf[BATCH][2048];
	struct mmsghdr msgs[BATCH];
	struct iovec iov[BATCH];
	long long end = now_ns() + (long long)(seconds * 1e9), got = 0, first = 0, last = 0;

	bind_port(fd, port);
	set_timeout(fd, 100000);
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < BATCH; i++) {
		iov[i].iov_base = buf[i];
		iov[i].iov_len = sizeof(buf[i]);
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	printf("ready\n");
	fflush(stdout);
	while (now_ns() < end) {
		int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
		if (n > 0) {
			last = now_ns();
			if (!got)
				first = last;
			got += n;
		}
	}
	printf("received %lld %lld %lld\n", got, first, last);
	return 0;
}

static int rr_server(int port, double seconds)
{
	int fd = udp_socket();
	char buf[2048];
	struct sockaddr_in from;
	socklen_t len;
	long long end = now_ns() + (long long)(seconds * 1e9);

	bind_port(fd, port);
	set_timeout(fd, 100000);
	printf("ready\n");
	fflush(stdout);
	while (now_ns() < end) {
		len = sizeof(from);
		ssize_t n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&from, &len);
		if (n > 0)
			sendto(fd, buf, n, 0, (struct sockaddr *)&from, len);
	}
	return 0;
}

static int cmp_ll(const void *a, const void *b)
{
	long long x = *(const long long *)a, y = *(const long long *)b;

	return (x > y) - (x < y);
}

static int rr_client(const char *ip, int port, int size, int count)
{
	int fd = udp_socket();
	struct sockaddr_in to = peer(ip, port);
	char buf[2048] = { 0 }, in[2048];
	long long *rtt = calloc(count, sizeof(*rtt));
	int done = 0;

	if (!rtt || connect(fd, (struct sockaddr *)&to, sizeof(to)) < 0) {
		perror("rr-client");
		return 2;
	}
	set_timeout(fd, 1000000);
	for (int i = 0; i < count; i++) {
		memcpy(buf, &i, sizeof(i));
		long long t = now_ns();
		if (send(fd, buf, size, 0) < 0)
			continue;
		for (;;) {  /* the answer to this request (a late one to an earlier request is skipped) */
			ssize_t n = recv(fd, in, sizeof(in), 0);
			if (n < 0)
				break;
			if (n >= (ssize_t)sizeof(i) && !memcmp(in, &i, sizeof(i))) {
				rtt[done++] = now_ns() - t;
				break;
			}
		}
	}
	qsort(rtt, done, sizeof(*rtt), cmp_ll);
	printf("rtt_ns");
	for (int i = 0; i < done; i++)
		printf(" %lld", rtt[i]);
	printf("\n");
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 6 && !strcmp(argv[1], "flood"))
		return flood(argv[2], atoi(argv[3]), atoi(argv[4]), atof(argv[5]));
	if (argc >= 4 && !strcmp(argv[1], "sink"))
		return sink(atoi(argv[2]), atof(argv[3]));
	if (argc >= 4 && !strcmp(argv[1], "rr-server"))
		return rr_server(atoi(argv[2]), atof(argv[3]));
	if (argc >= 6 && !strcmp(argv[1], "rr-client"))
		return rr_client(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
	fprintf(stderr, "usage: udp_load flood DST PORT SIZE SECONDS | sink PORT SECONDS | "
			"rr-server PORT SECONDS | rr-client DST PORT SIZE COUNT\n");
	return 2;
}
