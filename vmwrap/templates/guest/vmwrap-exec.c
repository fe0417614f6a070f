/* vmwrap-exec: run the job inside the guest as the job's user.
 * Busybox cannot switch uid portably, so this tiny static helper does
 * chroot -> setsid -> setgroups/setgid/setuid -> chdir -> execve, with the
 * job's exact environment read from a NUL-separated file.
 * usage: vmwrap-exec ROOT UID GID GROUPS UMASK CWD ENVFILE ARGSFILE PROG [LIMITSFILE]
 *        GROUPS is a comma list or "-"; UMASK is octal; ENVFILE and ARGSFILE hold
 *        NUL-terminated strings (ARGSFILE may be missing: no arguments). LIMITSFILE has lines
 *        `NAME SOFT HARD` (`core 0 unlimited`): the resource limits the job had on the host, set
 *        before dropping to the job's user so that the job runs with exactly those (missing: none).
 * The job runs in a child, leader of its own session and process group, whose id goes to
 * /run/vmwrap-job.pgid (init signals that group); this process waits for it and exits with its
 * status, writing the signal number to /run/vmwrap-job.signal when a signal killed it: a shell's
 * `wait` says 128+N for both `exit 128+N` and signal N, and the scheduler must tell them apart. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static pid_t child;

/* Before init knows the child's group (a few instructions), its signals reach this process: pass them on. */
static void forward(int sig) { if (child > 0) kill(-child, sig); }

static void put(const char *path, long v) {
    char buf[32], tmp[64];
    int n = snprintf(buf, sizeof buf, "%ld\n", v);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return;
    if (write(fd, buf, (size_t)n) == n) rename(tmp, path);
    close(fd);
}

static void die(const char *what, const char *arg) {
    fprintf(stderr, "vmwrap: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
    _exit(127);
}

/* Read a file of NUL-terminated strings into a NULL-terminated vector, leaving `lead` slots free. */
static char **read_vec(const char *path, size_t lead, size_t *count, int must_exist) {
    size_t cap = 1 << 16, len = 0; char *buf = malloc(cap);
    int fd = open(path, O_RDONLY);
    if (fd < 0) { if (must_exist) die("open", path); len = 0; }
    else {
        for (;;) {
            if (len == cap) { cap *= 2; buf = realloc(buf, cap); }
            ssize_t n = read(fd, buf + len, cap - len);
            if (n < 0) die("read", path);
            if (n == 0) break;
            len += (size_t)n;
        }
        close(fd);
    }
    size_t n = 0;
    for (size_t i = 0; i < len; i++) if (buf[i] == '\0') n++;
    char **v = calloc(lead + n + 1, sizeof(char *));
    size_t k = lead;
    for (size_t i = 0; i < len && k < lead + n; ) { v[k++] = buf + i; i += strlen(buf + i) + 1; }
    *count = n;
    return v;
}

static const struct { const char *name; int resource; } LIMITS[] = {
    {"core", RLIMIT_CORE}, {"cpu", RLIMIT_CPU}, {"fsize", RLIMIT_FSIZE}, {"data", RLIMIT_DATA},
    {"stack", RLIMIT_STACK}, {"nofile", RLIMIT_NOFILE}, {"as", RLIMIT_AS}, {"nproc", RLIMIT_NPROC},
    {"memlock", RLIMIT_MEMLOCK},
};
#define NLIMITS (sizeof LIMITS / sizeof *LIMITS)

static int limit_value(const char *s, rlim_t *v) {
    if (strcmp(s, "unlimited") == 0) { *v = RLIM_INFINITY; return 1; }
    char *end; errno = 0;
    unsigned long long n = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-') return 0;
    *v = (rlim_t)n;
    return 1;
}

/* Read LIMITSFILE (at most 4 KiB; unknown names and malformed lines are skipped). */
static void read_limits(const char *path, struct rlimit *want, int *have) {
    char buf[4096]; ssize_t n = 0;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return;
    n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return;
    buf[n] = '\0';
    char *save = NULL;
    for (char *line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char name[16], soft[24], hard[24];
        if (sscanf(line, "%15s %23s %23s", name, soft, hard) != 3) continue;
        for (size_t i = 0; i < NLIMITS; i++) {
            struct rlimit r;
            if (strcmp(name, LIMITS[i].name) != 0) continue;
            if (limit_value(soft, &r.rlim_cur) && limit_value(hard, &r.rlim_max) && r.rlim_cur <= r.rlim_max) {
                want[i] = r; have[i] = 1;
            }
        }
    }
}

/* Best effort per limit: a hard limit the guest kernel cannot raise to (nofile above its nr_open) is
 * lowered to what the kernel allows, the soft one with it. */
static void apply_limits(const struct rlimit *want, const int *have) {
    for (size_t i = 0; i < NLIMITS; i++) {
        if (!have[i]) continue;
        struct rlimit r = want[i], cur;
        if (setrlimit(LIMITS[i].resource, &r) == 0) continue;
        if (getrlimit(LIMITS[i].resource, &cur) != 0) continue;
        if (r.rlim_max > cur.rlim_max) r.rlim_max = cur.rlim_max;
        if (r.rlim_cur > r.rlim_max) r.rlim_cur = r.rlim_max;
        setrlimit(LIMITS[i].resource, &r);
    }
}

int main(int argc, char **argv) {
    if (argc != 10 && argc != 11) { fprintf(stderr, "vmwrap-exec: bad usage\n"); return 127; }
    const char *root = argv[1], *cwd = argv[6], *envfile = argv[7];
    uid_t uid = (uid_t)strtoul(argv[2], NULL, 10);
    gid_t gid = (gid_t)strtoul(argv[3], NULL, 10);
    gid_t groups[256]; size_t ng = 0;
    if (strcmp(argv[4], "-") != 0) {
        char *s = strdup(argv[4]), *tok, *save = NULL;
        for (tok = strtok_r(s, ",", &save); tok && ng < 256; tok = strtok_r(NULL, ",", &save))
            groups[ng++] = (gid_t)strtoul(tok, NULL, 10);
    }
    umask((mode_t)strtoul(argv[5], NULL, 8));

    /* Environment and arguments: read before chroot, they live on the control share. */
    size_t nenv, nargs;
    char **envp = read_vec(envfile, 0, &nenv, 1);
    char **args = read_vec(argv[8], 1, &nargs, 0);
    args[0] = argv[9];
    struct rlimit limits[NLIMITS]; int have[NLIMITS] = {0};
    if (argc == 11) read_limits(argv[10], limits, have);

    int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);
    for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++) signal(forwarded[i], forward);
    child = fork();
    if (child < 0) die("fork", NULL);
    if (child > 0) {
        int st;
        put("/run/vmwrap-job.pgid", (long)child);
        sigprocmask(SIG_SETMASK, &old, NULL);
        while (waitpid(child, &st, 0) < 0) if (errno != EINTR) die("waitpid", NULL);
        if (WIFSIGNALED(st)) { put("/run/vmwrap-job.signal", (long)WTERMSIG(st)); return 128 + WTERMSIG(st); }
        return WEXITSTATUS(st);
    }
    for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++) signal(forwarded[i], SIG_DFL);
    setsid();
    sigprocmask(SIG_SETMASK, &old, NULL);

    if (strcmp(root, "/") != 0) {
        if (chroot(root) != 0) die("chroot", root);
        if (chdir("/") != 0) die("chdir", "/");
    }
    apply_limits(limits, have);   /* as root: a hard limit above the guest's default can still be set */
    if (setgroups(ng, groups) != 0) die("setgroups", NULL);
    if (setgid(gid) != 0) die("setgid", argv[3]);
    if (setuid(uid) != 0) die("setuid", argv[2]);
    if (chdir(cwd) != 0) die("chdir", cwd);
    execve(argv[9], args, envp);
    if (errno == ENOEXEC) {           /* no shebang: run it with sh, as a batch system would */
        char **a = calloc(nargs + 3, sizeof(char *));
        a[0] = "/bin/sh";
        for (size_t i = 0; i <= nargs; i++) a[i + 1] = args[i];
        execve("/bin/sh", a, envp);
    }
    die("exec", argv[9]);
    return 127;
}
