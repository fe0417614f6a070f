/* TCP ping-pong for benchmarks/multinode.py: latency (1-byte round trips) and bandwidth (1 MiB
 * messages echoed back), as an MPI ping-pong measures them, with plain sockets so that it runs in
 * any appliance (built static on the host, run from the job's work dir).
 * usage: pingpong serve PORT | pingpong HOST PORT ROUNDS MIB */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static char buf[1 << 20];

static int full(int fd, char *p, size_t n, int rd) {
    while (n) {
        ssize_t r = rd ? read(fd, p, n) : write(fd, p, n);
        if (r <= 0) return -1;
        p += r; n -= (size_t)r;
    }
    return 0;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    int one = 1;
    if (argc == 3 && !strcmp(argv[1], "serve")) {
        int l = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 1)) { perror("pingpong: listen"); return 1; }
        int c = accept(l, NULL, NULL);
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        unsigned int n;  /* each message: a 4-byte length, then that many bytes, echoed back */
        while (full(c, (char *)&n, 4, 1) == 0 && n <= sizeof buf && full(c, buf, n, 1) == 0 && full(c, buf, n, 0) == 0) {}
        return 0;
    }
    if (argc != 5) { fprintf(stderr, "usage: pingpong serve PORT | pingpong HOST PORT ROUNDS MIB\n"); return 2; }
    struct addrinfo *ai, hint = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM};
    if (getaddrinfo(argv[1], argv[2], &hint, &ai)) { fprintf(stderr, "pingpong: cannot resolve %s\n", argv[1]); return 1; }
    int s = -1;
    for (int i = 0; i < 300 && s < 0; i++) {  /* the server may still be starting */
        s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, ai->ai_addr, ai->ai_addrlen)) { close(s); s = -1; usleep(100000); }
    }
    if (s < 0) { perror("pingpong: connect"); return 1; }
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int rounds = atoi(argv[3]), mib = atoi(argv[4]);
    unsigned int n = 1;
    double t0 = now();
    for (int i = 0; i < rounds; i++)
        if (full(s, (char *)&n, 4, 0) || full(s, buf, n, 0) || full(s, buf, n, 1)) { fprintf(stderr, "pingpong: lost\n"); return 1; }
    double lat = (now() - t0) / rounds / 2;
    n = sizeof buf;
    t0 = now();
    for (int i = 0; i < mib; i++)
        if (full(s, (char *)&n, 4, 0) || full(s, buf, n, 0) || full(s, buf, n, 1)) { fprintf(stderr, "pingpong: lost\n"); return 1; }
    double bw = 2.0 * mib / (now() - t0);
    printf("latency_us %.1f bandwidth_mib_s %.1f\n", lat * 1e6, bw);
    return 0;
}
