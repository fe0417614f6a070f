/* vmwrap-shell: the guest end of `vmwrap shell JOBID` (vmwrap/shell.py), one session at a time on
 * its port (the guest agent starts one per shell port).
 * usage: vmwrap-shell PORT ROOT UID GID GROUPS UMASK CWD ENVFILE
 * Serves the virtio port PORT (org.vmwrap.shell) for the job's life: the host opens a session with an
 * O frame "ROWS COLS TERM MODE" [NUL COMMAND]; this forks a shell (or `sh -c COMMAND`) as the job's user
 * in the job's root, work dir and environment (its TERM, COLUMNS and LINES are the caller's, not the
 * batch job's). MODE "tty": on a new pseudo-terminal the user owns, W frames resize it, E (the caller's
 * stdin ended) types its end-of-file character. MODE "pipe" (the caller has no terminal): stdin a pipe
 * that E closes, stdout and stderr one pipe, bytes untouched; with a fifth word "split" stderr is a pipe of its
 * own whose bytes come as e frames (older guests ignore the word). D frames carry data both ways; X "STATUS"
 * ends the session (exit code, or 128+N for signal N). When the host is gone (not back within 2 s: see
 * host_gone) the session gets SIGHUP, and SIGKILL 2 s later: the port must be free for the next one.
 * Frames: 1 type byte, 4-byte big-endian length, payload (at most FRAME_MAX bytes).
 * Nothing blocks: input for the shell waits in a bounded queue (the port is not read while it is full),
 * so a shell that reads nothing cannot stop its output, nor the host's leaving, from being seen.
 * The guest is the user's own (they are root in it): this protects nothing from them. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define FRAME_MAX 65536
#define QUEUE_MAX (4 * FRAME_MAX)

static unsigned char in[FRAME_MAX + 5];
static size_t have;
static unsigned char queue[QUEUE_MAX];  /* host input not yet taken by the shell */
static size_t queued;

/* Whether the host is connected, as far as the driver knows yet: while it is not, a read says EOF at
 * once and poll says POLLHUP. */
static int host_connected(int port) {
    struct pollfd f = {.fd = port, .events = POLLIN};
    return poll(&f, 1, 0) >= 0 && !(f.revents & POLLHUP);
}

/* The host is really gone: still not connected after GRACE_MS. The driver learns of a host's coming
 * and going from control messages handled later than data: a new session's O frame can be read
 * before its host counts as connected, and the previous host's leaving can be learnt after the next
 * one's O frame (an EOF then is stale). Without this grace such a session was taken for abandoned:
 * its shell killed, no X sent, the host waiting for ever (seen under load: a multi-node step hung). */
#define GRACE_MS 2000
static int host_gone(int port) {
    sigset_t io;
    sigemptyset(&io); sigaddset(&io, SIGIO);
    for (int waited = 0; waited < GRACE_MS; waited += 50) {
        if (host_connected(port)) return 0;
        sigtimedwait(&io, NULL, &(struct timespec){.tv_nsec = 50 * 1000000L});  /* the driver's news, or 50 ms */
    }
    return !host_connected(port);
}

static int write_all(int fd, const void *p, size_t n) {
    const unsigned char *b = p;
    int away_ms = 0;  /* how long the host has not been connected while this waits to write */
    while (n) {
        ssize_t w = write(fd, b, n);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) {  /* the host's buffer is full, or the host is not connected now */
            struct pollfd f = {.fd = fd, .events = POLLOUT};
            poll(&f, 1, 100);
            away_ms = host_connected(fd) ? 0 : away_ms + 100;
            if (away_ms >= GRACE_MS) return -1;
            continue;
        }
        if (w <= 0) return -1;
        b += w; n -= (size_t)w;
    }
    return 0;
}

static int send_frame(int port, char type, const void *p, size_t n) {
    unsigned char h[5] = {(unsigned char)type, (unsigned char)(n >> 24), (unsigned char)(n >> 16),
                          (unsigned char)(n >> 8), (unsigned char)n};
    return write_all(port, h, 5) < 0 || write_all(port, p, n) < 0 ? -1 : 0;
}

/* Read what the port has into `in`: 1 data (or nothing yet), 0 the host left. */
static int fill(int port) {
    if (have == sizeof in) have = 0;  /* cannot happen with valid frames: resynchronise by dropping */
    ssize_t r = read(port, in + have, sizeof in - have);
    if (r < 0 && (errno == EINTR || errno == EAGAIN)) return 1;
    if (r <= 0) return 0;
    have += (size_t)r;
    return 1;
}

/* The next complete frame in `in`, if any: its type, payload and length; consumed by drop(). */
static int frame(char *type, unsigned char **p, size_t *n) {
    if (have < 5) return 0;
    size_t len = ((size_t)in[1] << 24) | ((size_t)in[2] << 16) | ((size_t)in[3] << 8) | in[4];
    if (len > FRAME_MAX) { have = 0; return 0; }
    if (have < 5 + len) return 0;
    *type = (char)in[0]; *p = in + 5; *n = len;
    return 1;
}

static void drop(size_t n) { memmove(in, in + 5 + n, have - 5 - n); have -= 5 + n; }

static void enqueue(const unsigned char *p, size_t n) {
    if (n > QUEUE_MAX - queued) n = QUEUE_MAX - queued;  /* never: the port is not read while full */
    memcpy(queue + queued, p, n); queued += n;
}

static void winsize(int fd, const unsigned char *p, size_t n) {
    char buf[32]; unsigned rows, cols;
    if (n >= sizeof buf) return;
    memcpy(buf, p, n); buf[n] = '\0';
    if (sscanf(buf, "%u %u", &rows, &cols) == 2 && rows && cols && rows < 10000 && cols < 10000) {
        struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
        ioctl(fd, TIOCSWINSZ, &ws);
    }
}

static char **read_env(const char *path, const char *term) {
    static char buf[1 << 16];
    size_t len = 0, n = 0;
    int fd = open(path, O_RDONLY);
    if (fd >= 0) {
        ssize_t r;
        while (len < sizeof buf - 1 && (r = read(fd, buf + len, sizeof buf - 1 - len)) > 0) len += (size_t)r;
        close(fd);
    }
    buf[len] = '\0';
    for (size_t i = 0; i < len; i++) if (!buf[i]) n++;
    char **v = calloc(n + 2, sizeof(char *));
    size_t k = 0;
    for (size_t i = 0; i < len && k < n; i += strlen(buf + i) + 1)
        if (strncmp(buf + i, "TERM=", 5) && strncmp(buf + i, "COLUMNS=", 8) && strncmp(buf + i, "LINES=", 6))
            v[k++] = buf + i;  /* the batch job's terminal facts are not this terminal's */
    if (term) v[k++] = (char *)term;
    return v;
}

static void child(char **argv, const char *term, const char *cmd, int tty) {
    const char *root = argv[2], *cwd = argv[7];
    uid_t uid = (uid_t)strtoul(argv[3], NULL, 10);
    gid_t gid = (gid_t)strtoul(argv[4], NULL, 10);
    gid_t groups[256]; size_t ng = 0;
    if (strcmp(argv[5], "-") != 0) {
        char *s = strdup(argv[5]), *tok, *save = NULL;
        for (tok = strtok_r(s, ",", &save); tok && ng < 256; tok = strtok_r(NULL, ",", &save))
            groups[ng++] = (gid_t)strtoul(tok, NULL, 10);
    }
    char **envp = read_env(argv[8], term);
    umask((mode_t)strtoul(argv[6], NULL, 8));
    if (tty && (fchown(0, uid, 5) != 0 || fchmod(0, 0620) != 0))  /* the user's terminal, as login makes it */
        perror("vmwrap shell: cannot give the terminal to the job's user");
    if (strcmp(root, "/") != 0 && (chroot(root) != 0 || chdir("/") != 0)) { perror("vmwrap shell: chroot"); _exit(127); }
    if (setgroups(ng, groups) != 0 || setgid(gid) != 0 || setuid(uid) != 0) {
        perror("vmwrap shell: cannot become the job's user"); _exit(127);
    }
    if (chdir(cwd) != 0) perror("vmwrap shell: chdir to the work dir");
    for (int s = 1; s < NSIG; s++) signal(s, SIG_DFL);
    if (cmd) execle("/bin/sh", "sh", "-c", cmd, (char *)NULL, envp);
    else execle("/bin/sh", tty ? "-sh" : "sh", (char *)NULL, envp);
    perror("vmwrap shell: exec /bin/sh");
    _exit(127);
}

/* One session on an open port; returns when it ended or the host left. An O frame during a session is
 * a new host's (the previous one left without our noticing): that session ends and the next one
 * starts with the O frame kept (`reopen`). */
static int reopen;
static void session(int port, char **argv) {
    char type; unsigned char *p; size_t n;
    if (!reopen) have = 0;
    reopen = 0; queued = 0;
    for (;;) {  /* wait for O */
        while (!frame(&type, &p, &n)) {
            struct pollfd f = {.fd = port, .events = POLLIN};
            poll(&f, 1, -1);
            if (!fill(port)) return;
        }
        if (type == 'O') break;
        drop(n);
    }
    char open_[FRAME_MAX + 1];
    memcpy(open_, p, n); open_[n] = '\0';
    drop(n);
    const char *cmd = strlen(open_) < n ? open_ + strlen(open_) + 1 : NULL;
    unsigned rows = 24, cols = 80; char termname[64] = "dumb", mode[8] = "tty", split[8] = "", term[80];
    sscanf(open_, "%u %u %63s %7s %7s", &rows, &cols, termname, mode, split);
    int tty = strcmp(mode, "pipe") != 0;
    snprintf(term, sizeof term, "TERM=%s", termname);
    struct winsize ws = {.ws_row = (unsigned short)(rows && rows < 10000 ? rows : 24),
                         .ws_col = (unsigned short)(cols && cols < 10000 ? cols : 80)};
    int to_child = -1, from_child = -1, from_err = -1;  /* the shell's input, output (and errors), our ends */
    pid_t pid;
    if (tty) {
        pid = forkpty(&to_child, NULL, NULL, &ws);
        from_child = to_child;
    } else {
        int a[2], b[2], c[2] = {-1, -1};  /* c: errors apart ("split": e frames), else with the output */
        if (pipe2(a, O_CLOEXEC) != 0 || pipe2(b, O_CLOEXEC) != 0
            || (strcmp(split, "split") == 0 && pipe2(c, O_CLOEXEC) != 0)) { send_frame(port, 'X', "127", 3); return; }
        pid = fork();
        if (pid == 0) {
            setsid();
            dup2(a[0], 0); dup2(b[1], 1); dup2(c[1] >= 0 ? c[1] : b[1], 2);
        }
        close(a[0]); close(b[1]);
        if (c[1] >= 0) close(c[1]);
        to_child = a[1]; from_child = b[0]; from_err = c[0];
    }
    if (pid < 0) { send_frame(port, 'X', "127", 3); return; }
    if (pid == 0) { close(port); child(argv, term, cmd, tty); }
    fcntl(to_child, F_SETFL, fcntl(to_child, F_GETFL) | O_NONBLOCK);
    int input_done = 0, left = 0;  /* E seen (pipe mode: close once the queue drained); the host left */
    unsigned char out[16384];
    for (;;) {
        while (queued < QUEUE_MAX - FRAME_MAX && frame(&type, &p, &n)) {
            if (type == 'O') { reopen = 1; break; }  /* kept in `in` for the next session */
            if (type == 'D' && !input_done) enqueue(p, n);
            else if (type == 'W' && tty) winsize(to_child, p, n);
            else if (type == 'E' && !input_done) {
                input_done = 1;
                if (tty) { struct termios t; unsigned char eof = 4;
                    if (tcgetattr(to_child, &t) == 0) eof = t.c_cc[VEOF];
                    enqueue(&eof, 1); }
            }
            drop(n);
        }
        if (queued && to_child >= 0) {
            ssize_t w = write(to_child, queue, queued);
            if (w > 0) { memmove(queue, queue + w, queued - (size_t)w); queued -= (size_t)w; }
            else if (w < 0 && errno != EAGAIN && errno != EINTR) queued = 0;  /* the shell closed its input */
        }
        if (reopen) { left = 1; break; }
        if (!tty && input_done && !queued && to_child >= 0) { close(to_child); to_child = -1; }
        struct pollfd fds[4] = {{.fd = from_child, .events = POLLIN},
                                {.fd = queued < QUEUE_MAX - FRAME_MAX ? port : -1, .events = POLLIN},
                                {.fd = queued && to_child >= 0 ? to_child : -1, .events = POLLOUT},
                                {.fd = from_err, .events = POLLIN}};
        if (poll(fds, 4, -1) < 0) { if (errno == EINTR) continue; break; }
        if (fds[3].revents) {
            ssize_t r = read(from_err, out, sizeof out);
            if (r > 0) { if (send_frame(port, 'e', out, (size_t)r) < 0) { left = 1; break; } continue; }
            if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
            close(from_err); from_err = -1;
            if (from_child < 0) break;  /* both ends of file: every process holding the pipes is gone */
            continue;
        }
        if (fds[0].revents) {
            ssize_t r = read(from_child, out, sizeof out);
            if (r > 0) { if (send_frame(port, 'D', out, (size_t)r) < 0) { left = 1; break; } continue; }
            if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
            if (from_err >= 0) { close(from_child); from_child = -1; continue; }  /* errors may still come */
            break;  /* EOF or EIO: every process holding the terminal or the pipe is gone */
        }
        if (fds[1].revents && !fill(port) && host_gone(port)) { left = 1; break; }
    }
    if (left) { kill(-pid, SIGHUP); kill(pid, SIGHUP); }
    int st = -1;
    for (int i = 0; ; i++) {  /* a shell that ignores SIGHUP is killed after 2 s: the port must be free */
        pid_t w = waitpid(pid, &st, left ? WNOHANG : 0);
        if (w == pid) break;
        if (w < 0 && errno != EINTR) { st = -1; break; }
        if (i == 20) { kill(-pid, SIGKILL); kill(pid, SIGKILL); }
        usleep(100000);
    }
    int status = st == -1 ? 255 : WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st);
    char buf[16];
    int len = snprintf(buf, sizeof buf, "%d", status);
    if (!left) send_frame(port, 'X', buf, (size_t)len);
    if (to_child >= 0) close(to_child);
    if (from_child >= 0 && from_child != to_child) close(from_child);
    if (from_err >= 0) close(from_err);
}

int main(int argc, char **argv) {
    if (argc != 9) { fprintf(stderr, "vmwrap-shell: bad usage\n"); return 127; }
    signal(SIGPIPE, SIG_IGN);
    /* The port is kept open; while no host is connected its read() says EOF at once. The driver
     * signals SIGIO when a host connects: wait for it (or 5 s) instead of polling the port. */
    sigset_t io;
    sigemptyset(&io); sigaddset(&io, SIGIO);
    sigprocmask(SIG_BLOCK, &io, NULL);
    for (;;) {
        int port = open(argv[1], O_RDWR | O_CLOEXEC | O_NONBLOCK);
        if (port < 0) { sleep(1); continue; }
        fcntl(port, F_SETOWN, getpid());
        fcntl(port, F_SETFL, fcntl(port, F_GETFL) | O_ASYNC);
        for (;;) {
            session(port, argv);
            if (reopen) continue;
            struct timespec t = {.tv_sec = 5};
            sigtimedwait(&io, NULL, &t);  /* the host left (or never came): until it connects again */
            while (sigtimedwait(&io, NULL, &(struct timespec){0}) > 0) {}
        }
    }
}
