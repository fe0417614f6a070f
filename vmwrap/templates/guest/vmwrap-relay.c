/* vmwrap-relay PORT PROGRAM ARGS...: give PROGRAM (the 9p mount) fd 3, one end of a socketpair,
 * and relay the other end to/from the virtio-serial PORT in a background process.
 * Why: the 9p client's trans=fd needs kernel_read/kernel_write, which virtio-serial ports do not
 * offer; sockets do. The relay is an ordinary guest process, so it is saved and restored with the VM.
 * Exit status: PROGRAM's (the relay keeps running after it). */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

static void nap(void) { struct timespec t = {0, 50 * 1000 * 1000}; nanosleep(&t, NULL); }

/* Write all of buf; a disconnected host (EAGAIN, ENOTCONN, EPIPE on the port) is waited out. */
static int put(int fd, const char *buf, ssize_t n) {
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w > 0) { buf += w; n -= w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == ENOTCONN || errno == EPIPE || errno == ENODEV)) { nap(); continue; }
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    static char buf[1 << 16];
    int sv[2], port;
    if (argc < 3) { fprintf(stderr, "usage: vmwrap-relay PORT PROGRAM ARGS...\n"); return 2; }
    if ((port = open(argv[1], O_RDWR | O_CLOEXEC)) < 0) { perror(argv[1]); return 1; }
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) { perror("socketpair"); return 1; }
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
            ssize_t n = read(port, buf, sizeof buf);
            if (n > 0) { if (put(sv[0], buf, n) < 0) return 1; }
            else nap(); /* host end closed (VM being saved/restored): wait for it to come back */
        } else if (p[0].revents & (POLLHUP | POLLERR)) {
            nap();
        }
        if (p[1].revents & POLLIN) {
            ssize_t n = read(sv[0], buf, sizeof buf);
            if (n > 0) { if (put(port, buf, n) < 0) return 1; }
            else if (n == 0) return 0; /* unmounted */
        } else if (p[1].revents & (POLLHUP | POLLERR)) {
            return 0;
        }
    }
}
