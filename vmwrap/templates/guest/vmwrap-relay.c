/* vmwrap-relay PORT PROGRAM ARGS...: give PROGRAM (the 9p mount) fd 3, one end of a socketpair,
 * and relay the other end to/from the virtio-serial PORT in a background process.
 * Why: the 9p client's trans=fd needs kernel_read/kernel_write, which virtio-serial ports do not
 * offer; sockets do. The relay is an ordinary guest process, so it is saved and restored with the VM.
 * Speed (every guest syscall and wakeup is dear under TCG): a port read returns one 4 KiB buffer
 * the host filled, so the port is non-blocking and drained into one big buffer, and only whole 9P
 * messages go on to the socket (one wakeup of the 9p client per reply); the socket side is read up
 * to a whole message (msize up to 1 MiB) at once.
 * Exit status: PROGRAM's (the relay keeps running after it). */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define BUF ((1 << 20) + 65536) /* one 1 MiB message and then some: a read never splits one twice */

static void nap(void) { struct timespec t = {0, 50 * 1000 * 1000}; nanosleep(&t, NULL); }

/* Write all of buf to fd (maybe non-blocking). A full port waits for room; a disconnected host
 * (ENOTCONN, EPIPE, ENODEV, or EAGAIN with POLLHUP: the VM being saved/restored) is waited out. */
static int put(int fd, const char *buf, ssize_t n) {
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w > 0) { buf += w; n -= w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) {
            struct pollfd p = {fd, POLLOUT, 0};
            if (poll(&p, 1, 50) > 0 && (p.revents & POLLOUT)) continue;
            if (p.revents & (POLLHUP | POLLERR)) nap();
            continue;
        }
        if (w < 0 && (errno == ENOTCONN || errno == EPIPE || errno == ENODEV)) { nap(); continue; }
        return -1;
    }
    return 0;
}

/* How many bytes of buf[0..n) to hand to the 9p client now: whole messages only, so its reader
 * wakes once per reply, not once per 4 KiB the port delivered. Anything that cannot be framed (a size
 * below the 7-byte header or above the buffer) and a full buffer go through as they are. */
static size_t framed(const char *buf, size_t n) {
    size_t off = 0;
    while (n - off >= 4) {
        uint32_t len;
        memcpy(&len, buf + off, 4);  /* 9P sizes are little-endian, as this guest */
        if (len < 7 || len > BUF) return n;
        if (n - off < len) break;
        off += len;
    }
    return n == BUF ? n : off;
}

int main(int argc, char **argv) {
    static char down[BUF], up[BUF];
    size_t have = 0; /* bytes of an incomplete message from the host kept in down */
    int sv[2], port;
    if (argc < 3) { fprintf(stderr, "usage: vmwrap-relay PORT PROGRAM ARGS...\n"); return 2; }
    if ((port = open(argv[1], O_RDWR | O_CLOEXEC | O_NONBLOCK)) < 0) { perror(argv[1]); return 1; }
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) { perror("socketpair"); return 1; }
    for (int i = 0; i < 2; i++) { /* room for a whole 1 MiB message each way: one write, one wakeup */
        int sz = 2 << 20;
        setsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
        setsockopt(sv[i], SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    }
    signal(SIGPIPE, SIG_IGN);
    pid_t pid = fork();
    if (pid < 0) { perror("fork"); return 1; }
    if (pid > 0) { /* foreground: the mount, with fd 3 */
        close(sv[0]); close(port);
        if (dup2(sv[1], 3) < 0) { perror("dup2"); return 1; }
        if (sv[1] != 3) close(sv[1]);
        execv(argv[2], argv + 2);
        perror(argv[2]);
        return 127;
    }
    close(sv[1]);
    setsid();
    int dev = open("/dev/null", O_RDWR);
    if (dev >= 0) { dup2(dev, 0); dup2(dev, 1); dup2(dev, 2); if (dev > 2) close(dev); }
    struct pollfd p[2] = {{port, POLLIN, 0}, {sv[0], POLLIN, 0}};
    for (;;) {
        if (poll(p, 2, -1) < 0) { if (errno == EINTR) continue; nap(); continue; }
        if (p[0].revents & POLLIN) {
            ssize_t got = 0, n = -1;
            while (have < BUF && (n = read(port, down + have, BUF - have)) > 0) { have += n; got += n; }
            if (got > 0) {
                size_t done = framed(down, have);
                if (done > 0) {
                    if (put(sv[0], down, done) < 0) return 1;
                    memmove(down, down + done, have - done);
                    have -= done;
                }
            } else if (n == 0 || errno != EAGAIN) nap(); /* host end closed (VM being saved/restored): wait for it to come back */
        } else if (p[0].revents & (POLLHUP | POLLERR)) {
            nap();
        }
        if (p[1].revents & POLLIN) {
            ssize_t n = read(sv[0], up, BUF);
            if (n > 0) { if (put(port, up, n) < 0) return 1; }
            else if (n == 0) return 0; /* unmounted */
        } else if (p[1].revents & (POLLHUP | POLLERR)) {
            return 0;
        }
    }
}
