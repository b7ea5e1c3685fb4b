// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* The C reference consumer of tools/bench/drain.py, built for the benchmark only
 * (vnet itself needs no compiler): libbpf's ring_buffer__new/ring_buffer__poll on
 * a ring-buffer map fd it inherits, every record appended to a file in the ring's
 * own framing (u32 length, u32 0, the record, padding to 8 bytes: what vnet's
 * trace files carry in their events chunks), through a 4 MiB buffer, one write()
 * per buffer, fsync at the end.
 *
 *   ring_consumer MAP_FD OUT_FILE [POLL_MS]     (POLL_MS: 100, as vnet's readers)
 *
 * Like vnet's readers, it also reads after a poll that timed out (the programs
 * wake the reader only every 64 events). Prints "ready" once polling; on
 * SIGTERM/SIGINT drains what is left, fsyncs and prints "events N bytes B".
 *
 *   gcc -O2 -o ring_consumer ring_consumer.c -lbpf
 */
#include <bpf/libbpf.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BUF_BYTES (4u << 20)

struct out {
	int fd;
	size_t used;
	unsigned long long events, bytes;
	char *buf;
};

static volatile sig_atomic_t stopping;

static void on_signal(int sig)
{
	(void)sig;
	stopping = 1;
}

static void flush_out(struct out *o)
{
	size_t done = 0;

	while (done < o->used) {
		ssize_t n = write(o->fd, o->buf + done, o->used - done);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror("write");
			exit(1);
		}
		done += (size_t)n;
	}
	o->bytes += o->used;
	o->used = 0;
}

static int on_record(void *ctx, void *data, size_t size)
{
	struct out *o = ctx;
	size_t framed = (8 + size + 7) & ~(size_t)7;
	uint32_t hdr[2] = {(uint32_t)size, 0};

	if (o->used + framed > BUF_BYTES)
		flush_out(o);
	memcpy(o->buf + o->used, hdr, sizeof(hdr));
	memcpy(o->buf + o->used + 8, data, size);
	memset(o->buf + o->used + 8 + size, 0, framed - 8 - size);
	o->used += framed;
	o->events++;
	return 0;
}

int main(int argc, char **argv)
{
	struct out o = {0};
	struct ring_buffer *rb;
	struct sigaction sa = {0};
	int map_fd, err, poll_ms = 100;

	if (argc != 3 && argc != 4) {
		fprintf(stderr, "usage: %s MAP_FD OUT_FILE [POLL_MS]\n", argv[0]);
		return 2;
	}
	map_fd = atoi(argv[1]);
	if (argc == 4)
		poll_ms = atoi(argv[3]);
	o.fd = open(argv[2], O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (o.fd < 0) {
		perror(argv[2]);
		return 1;
	}
	o.buf = malloc(BUF_BYTES);
	if (!o.buf)
		return 1;
	sa.sa_handler = on_signal; /* no SA_RESTART: epoll_wait returns EINTR */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	rb = ring_buffer__new(map_fd, on_record, &o, NULL);
	if (!rb) {
		fprintf(stderr, "ring_buffer__new: %s\n", strerror(errno));
		return 1;
	}
	printf("ready\n");
	fflush(stdout);
	while (!stopping) {
		/* vnet's readers wait with the same timeout. The programs wake the reader
		 * only every 64 events (wakeup_every), and ring_buffer__poll reads only the
		 * rings epoll reported: after a quiet timeout, read anyway, as vnet does. */
		err = ring_buffer__poll(rb, poll_ms);
		if (err == 0)
			err = ring_buffer__consume(rb);
		if (err < 0 && err != -EINTR) {
			fprintf(stderr, "ring_buffer__poll: %s\n", strerror(-err));
			return 1;
		}
	}
	while ((err = ring_buffer__consume(rb)) > 0)
		;
	flush_out(&o);
	fsync(o.fd);
	close(o.fd);
	ring_buffer__free(rb);
	printf("events %llu bytes %llu\n", o.events, o.bytes);
	return 0;
}
