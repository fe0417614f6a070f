/* vmwrap-shell: the guest end of `vmwrap shell JOBID` (vmwrap/shell.py), one session at a time.
 * usage: vmwrap-shell PORT ROOT UID GID GROUPS UMASK CWD ENVFILE
 * Serves the virtio port PORT (org.vmwrap.shell) forever: the host opens a session with an O frame,
 * this forks a shell on a new pseudo-terminal as the job's user in the job's root, work dir and
 * environment (its TERM, COLUMNS and LINES: this terminal's), relays D(ata) frames both ways, applies W(indow size) frames, turns E (the
 * host's stdin ended) into the terminal's end-of-file character, and ends with X "STATUS" (exit code,
 * or 128+N for signal N). When the host goes away (EOF on the port) the session gets SIGHUP.
 * Frames: 1 type byte, 4-byte big-endian length, payload (at most FRAME_MAX bytes).
 * The guest is the user's own (they are root in it): this protects nothing from them; it only keeps a
 * broken host connection from wedging the port for the next session. */
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
#include <unistd.h>

#define FRAME_MAX 65536

static unsigned char in[FRAME_MAX + 5];
static size_t have;

static int write_all(int fd, const void *p, size_t n) {
    const unsigned char *b = p;
    while (n) {
        ssize_t w = write(fd, b, n);
        if (w < 0 && errno == EINTR) continue;
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

/* Read what the port has into `in`; 0 on EOF or error. */
static int fill(int port) {
    if (have == sizeof in) have = 0;  /* cannot happen with valid frames: resynchronise by dropping */
    ssize_t r = read(port, in + have, sizeof in - have);
    if (r < 0 && errno == EINTR) return 1;
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

static void child(char **argv, const char *term, const char *cmd) {
    const char *root = argv[2], *cwd = argv[7];
    gid_t groups[256]; size_t ng = 0;
    if (strcmp(argv[5], "-") != 0) {
        char *s = strdup(argv[5]), *tok, *save = NULL;
        for (tok = strtok_r(s, ",", &save); tok && ng < 256; tok = strtok_r(NULL, ",", &save))
            groups[ng++] = (gid_t)strtoul(tok, NULL, 10);
    }
    char **envp = read_env(argv[8], term);
    umask((mode_t)strtoul(argv[6], NULL, 8));
    if (strcmp(root, "/") != 0 && (chroot(root) != 0 || chdir("/") != 0)) { perror("vmwrap shell: chroot"); _exit(127); }
    if (setgroups(ng, groups) != 0 || setgid((gid_t)strtoul(argv[4], NULL, 10)) != 0
        || setuid((uid_t)strtoul(argv[3], NULL, 10)) != 0) { perror("vmwrap shell: cannot become the job's user"); _exit(127); }
    if (chdir(cwd) != 0) perror("vmwrap shell: chdir to the work dir");
    for (int s = 1; s < NSIG; s++) signal(s, SIG_DFL);
    if (cmd) execle("/bin/sh", "sh", "-c", cmd, (char *)NULL, envp);
    else execle("/bin/sh", "-sh", (char *)NULL, envp);
    perror("vmwrap shell: exec /bin/sh");
    _exit(127);
}

/* One session on an open port; returns when it ended or the host left. */
static void session(int port, char **argv) {
    char type; unsigned char *p; size_t n;
    have = 0;
    for (;;) {  /* wait for O "ROWS COLS TERM" [NUL command] */
        while (!frame(&type, &p, &n)) if (!fill(port)) return;
        if (type == 'O') break;
        drop(n);
    }
    char open_[FRAME_MAX + 1];
    memcpy(open_, p, n); open_[n] = '\0';
    drop(n);
    const char *cmd = strlen(open_) < n ? open_ + strlen(open_) + 1 : NULL;
    unsigned rows = 24, cols = 80; char termname[64] = "dumb", term[80];
    sscanf(open_, "%u %u %63s", &rows, &cols, termname);
    snprintf(term, sizeof term, "TERM=%s", termname);
    struct winsize ws = {.ws_row = (unsigned short)(rows && rows < 10000 ? rows : 24),
                         .ws_col = (unsigned short)(cols && cols < 10000 ? cols : 80)};
    int master;
    pid_t pid = forkpty(&master, NULL, NULL, &ws);
    if (pid < 0) { send_frame(port, 'X', "127", 3); return; }
    if (pid == 0) { close(port); child(argv, term, cmd); }
    int status = -1;
    unsigned char out[16384];
    for (;;) {
        while (frame(&type, &p, &n)) {
            if (type == 'D') write_all(master, p, n);
            else if (type == 'W') winsize(master, p, n);
            else if (type == 'E') { struct termios t; unsigned char eof = 4;
                if (tcgetattr(master, &t) == 0) eof = t.c_cc[VEOF];
                write_all(master, &eof, 1); }
            drop(n);
        }
        struct pollfd fds[2] = {{.fd = port, .events = POLLIN}, {.fd = master, .events = POLLIN}};
        if (poll(fds, 2, -1) < 0) { if (errno == EINTR) continue; break; }
        if (fds[1].revents) {
            ssize_t r = read(master, out, sizeof out);
            if (r > 0) { if (send_frame(port, 'D', out, (size_t)r) < 0) break; continue; }
            if (r < 0 && errno == EINTR) continue;
            break;  /* EIO: every process holding the terminal is gone */
        }
        if (fds[0].revents && !fill(port)) { kill(-pid, SIGHUP); kill(pid, SIGHUP); break; }
    }
    int st = -1;
    for (int i = 0; ; i++) {  /* a shell that ignores SIGHUP is killed after 2 s: the port must be free */
        pid_t w = waitpid(pid, &st, WNOHANG);
        if (w == pid) break;
        if (w < 0 && errno != EINTR) { st = -1; break; }
        if (i == 20) { kill(-pid, SIGKILL); kill(pid, SIGKILL); }
        usleep(100000);
    }
    if (st != -1) status = WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st);
    char buf[16];
    int len = snprintf(buf, sizeof buf, "%d", status < 0 ? 255 : status);
    send_frame(port, 'X', buf, (size_t)len);
    close(master);
}

int main(int argc, char **argv) {
    if (argc != 9) { fprintf(stderr, "vmwrap-shell: bad usage\n"); return 127; }
    signal(SIGPIPE, SIG_IGN);
    for (;;) {
        int port = open(argv[1], O_RDWR | O_CLOEXEC);
        if (port < 0) { sleep(1); continue; }
        session(port, argv);
        close(port);
        usleep(100000);
    }
}
