/* vmwrap-srun: `srun` inside a job's VM (installed as /usr/local/bin/srun when the host serves steps).
 * Why: the step must be a real scheduler step (accounting, step environment, limits), and only the
 * host can make one. This shim sends its argv to the host over the virtio port org.vmwrap.steps; the
 * job's payload there validates the options and runs the real srun, whose tasks (`vmwrap.steps`) ask
 * back for the command to be run here. Each task's environment is this process's own plus the
 * step's SLURM_* variables from the host; its stdout/stderr go back through srun (labels, -o) and
 * come out on this process's stdout/stderr; it exits as the host's srun did.
 * A VM has a few step ports (org.vmwrap.steps, .1, .2, ...), each opening once (EBUSY): this takes one
 * that is free, so that many steps run at once; with all taken it waits for one.
 * Frames both ways: "VWS1" type(1) step(4) task(2) len(4) data(len <= FRAME_MAX), big-endian; the
 * host's frames are bounded and checked, and anything not for this step is skipped. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define FRAME_MAX (1 << 17)
#define HDR 15
#define MAX_TASKS 64
#define PORT_NAME "org.vmwrap.steps"

extern char **environ;
static int port = -1;
static uint32_t step_id;
static volatile sig_atomic_t pending_sig;

struct task { int used, id, out, err; pid_t pid; int status_sent; };
static struct task tasks[MAX_TASKS];

static void nap(long ms) { struct timespec t = {ms / 1000, (ms % 1000) * 1000000L}; nanosleep(&t, NULL); }

static int put_all(int fd, const char *buf, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w > 0) { buf += w; n -= (size_t)w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == ENOTCONN)) { nap(20); continue; }
        return -1;
    }
    return 0;
}

static void be32(unsigned char *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }
static uint32_t rd32(const unsigned char *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }

static void send_frame(char type, int task, const void *data, size_t len) {
    static unsigned char buf[HDR + FRAME_MAX];
    if (len > FRAME_MAX) len = FRAME_MAX;
    memcpy(buf, "VWS1", 4); buf[4] = (unsigned char)type; be32(buf + 5, step_id);
    buf[9] = (unsigned char)(task >> 8); buf[10] = (unsigned char)task; be32(buf + 11, (uint32_t)len);
    if (len) memcpy(buf + HDR, data, len);
    if (put_all(port, (const char *)buf, HDR + len) < 0) { perror("vmwrap srun: writing to the host"); exit(1); }
}

/* The step ports' devices, found by name (the shim runs in the job's root, which has /sys): PORT_NAME
 * and PORT_NAME.N. Returns how many (at most MAX_PORTS). */
#define MAX_PORTS 16
static char ports[MAX_PORTS][300];
static int find_ports(void) {
    DIR *d = opendir("/sys/class/virtio-ports");
    struct dirent *e;
    int n = 0;
    size_t l = strlen(PORT_NAME);
    if (!d) return 0;
    while ((e = readdir(d)) && n < MAX_PORTS) {
        char p[512], name[64] = {0};
        if (e->d_name[0] == '.') continue;
        snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", e->d_name);
        FILE *f = fopen(p, "r");
        if (!f) continue;
        if (fgets(name, sizeof name, f)) name[strcspn(name, "\n")] = 0;
        fclose(f);
        if (strncmp(name, PORT_NAME, l) == 0 && (name[l] == 0 || (name[l] == '.' && name[l + 1] >= '1' && name[l + 1] <= '9')))
            snprintf(ports[n++], sizeof ports[0], "/dev/%s", e->d_name);
    }
    closedir(d);
    return n;
}

/* Input from the host, reassembled into frames; bytes before a magic are skipped. */
static unsigned char in[2 * (HDR + FRAME_MAX)];
static size_t inlen;

static int next_frame(char *type, uint32_t *step, int *task, unsigned char **data, size_t *len) {
    for (;;) {
        if (inlen < HDR) return 0;
        if (memcmp(in, "VWS1", 4) != 0) { memmove(in, in + 1, --inlen); continue; }
        uint32_t n = rd32(in + 11);
        if (n > FRAME_MAX) { memmove(in, in + 1, --inlen); continue; }
        if (inlen < HDR + n) return 0;
        *type = (char)in[4]; *step = rd32(in + 5); *task = in[9] << 8 | in[10];
        *data = in + HDR; *len = n;
        return 1;
    }
}

static void consume(size_t len) { memmove(in, in + HDR + len, inlen - HDR - len); inlen -= HDR + len; }

static const char *prog = "srun";  /* the launcher this shim is installed as (main) */

static void on_signal(int sig) { pending_sig = sig; }

/* What qrsh_starter runs for a `qrsh -inherit HOST WORDS...` task: the user's shell with the words
 * joined by single blanks (`sh -c "WORDS"`; MPI launchers send shell syntax such as Open MPI's
 * "( test ! -r ./.profile || . ./.profile; orted ... )"), unless -noshell came before HOST: the words
 * as they are. srun's words are always a program and its arguments. */
static char **task_command(int argc, char **argv, int cmd_index) {
    if (strcmp(prog, "qrsh") != 0) return argv + cmd_index;
    for (int i = 1; i < cmd_index - 1; i++) if (strcmp(argv[i], "-noshell") == 0) return argv + cmd_index;
    size_t n = 1;
    for (int i = cmd_index; i < argc; i++) n += strlen(argv[i]) + 1;
    char *line = malloc(n), **cmd = calloc(4, sizeof *cmd);
    if (!line || !cmd) { perror("vmwrap qrsh: malloc"); exit(1); }
    line[0] = 0;
    for (int i = cmd_index; i < argc; i++) { if (i > cmd_index) strcat(line, " "); strcat(line, argv[i]); }
    cmd[0] = "/bin/sh"; cmd[1] = "-c"; cmd[2] = line;
    return cmd;
}

static void start_task(int id, char **cmd, const unsigned char *env, size_t envlen) {
    struct task *t = NULL;
    for (int i = 0; i < MAX_TASKS; i++) if (!tasks[i].used) { t = &tasks[i]; break; }
    if (!t) { const char *m = "vmwrap srun: too many tasks in one VM\n"; send_frame('E', id, m, strlen(m)); send_frame('X', id, "exit 1", 6); return; }
    int o[2], e[2];
    if (pipe2(o, O_CLOEXEC) < 0 || pipe2(e, O_CLOEXEC) < 0) { perror("vmwrap srun: pipe"); exit(1); }
    pid_t pid = fork();
    if (pid < 0) { perror("vmwrap srun: fork"); exit(1); }
    if (pid == 0) {
        /* The task's environment: ours, then the step's NAME=value strings (NUL-separated). */
        size_t n = 0, k = 0;
        for (char **p = environ; *p; p++) n++;
        for (size_t i = 0; i < envlen; i++) if (env[i] == 0) n++;
        char **envp = calloc(n + 1, sizeof *envp);
        char *copy = malloc(envlen + 1);
        memcpy(copy, env, envlen); copy[envlen] = 0;
        for (char **p = environ; *p; p++) {
            int overridden = 0;
            size_t klen = strcspn(*p, "=");
            for (size_t i = 0; i < envlen; i += strlen(copy + i) + 1)
                if (strncmp(copy + i, *p, klen + 1) == 0) { overridden = 1; break; }
            if (!overridden) envp[k++] = *p;
        }
        for (size_t i = 0; i < envlen; i += strlen(copy + i) + 1) if (strchr(copy + i, '=')) envp[k++] = copy + i;
        envp[k] = NULL;
        for (int s = 1; s < 32; s++) signal(s, SIG_DFL);
        setpgid(0, 0);
        dup2(o[1], 1); dup2(e[1], 2);
        environ = envp;
        execvp(cmd[0], cmd);
        fprintf(stderr, "vmwrap %s: %s: %s\n", prog, cmd[0], strerror(errno));
        _exit(errno == ENOENT ? 127 : 126);
    }
    close(o[1]); close(e[1]);
    *t = (struct task){1, id, o[0], e[0], pid, 0};
}

static void pump(struct task *t, int *fd, char type) {
    static char buf[32768];
    ssize_t n = read(*fd, buf, sizeof buf);
    if (n > 0) send_frame(type, t->id, buf, (size_t)n);
    else if (n == 0 || (errno != EINTR && errno != EAGAIN)) { close(*fd); *fd = -1; }
}

static void reap(void) {
    for (int i = 0; i < MAX_TASKS; i++) {
        struct task *t = &tasks[i];
        int st;
        if (!t->used || t->status_sent || t->out >= 0 || t->err >= 0) continue;
        if (waitpid(t->pid, &st, 0) != t->pid) continue;
        char msg[32];
        if (WIFSIGNALED(st)) snprintf(msg, sizeof msg, "signal %d", WTERMSIG(st));
        else snprintf(msg, sizeof msg, "exit %d", WEXITSTATUS(st));
        send_frame('X', t->id, msg, strlen(msg));
        t->used = 0;
    }
}

int main(int argc, char **argv) {
    /* installed as the scheduler's launcher (srun, qrsh or pbs_tmrsh): its messages say that name, as the
     * real one would; pbs_tmrsh's words, as srun's, are a program and its arguments (tm_spawn's argv) */
    const char *base = argc > 0 && argv[0] ? strrchr(argv[0], '/') : NULL;
    base = base ? base + 1 : (argc > 0 && argv[0] ? argv[0] : "");
    prog = strcmp(base, "qrsh") == 0 ? "qrsh" : strcmp(base, "pbs_tmrsh") == 0 ? "pbs_tmrsh" : "srun";
    size_t total = 0;
    for (int i = 1; i < argc; i++) total += strlen(argv[i]) + 1;
    if (total > FRAME_MAX) { fprintf(stderr, "%s: error: vmwrap: the command line is longer than %d bytes\n", prog, FRAME_MAX); return 1; }
    int nports = find_ports();
    if (nports == 0) { fprintf(stderr, "%s: error: vmwrap: this VM has no step port (%s)\n", prog, PORT_NAME); return 1; }
    int said = 0;
    for (;;) {
        int i;
        for (i = 0; i < nports; i++) {
            if ((port = open(ports[i], O_RDWR | O_CLOEXEC)) >= 0) break;
            if (errno != EBUSY) { fprintf(stderr, "%s: error: vmwrap: %s: %s\n", prog, ports[i], strerror(errno)); return 1; }
        }
        if (i < nports) break;
        if (!said++) fprintf(stderr, "%s: vmwrap: %d steps are running in this VM (as many as it runs at once); "
                                     "waiting for one to end\n", prog, nports);
        nap(100);
    }
    int ur = open("/dev/urandom", O_RDONLY);
    if (ur < 0 || read(ur, &step_id, sizeof step_id) != sizeof step_id) step_id = (uint32_t)getpid() ^ (uint32_t)time(NULL);
    if (ur >= 0) close(ur);
    char *req = malloc(total + 1), *p = req;
    for (int i = 1; i < argc; i++) { size_t l = strlen(argv[i]) + 1; memcpy(p, argv[i], l); p += l; }
    send_frame('Q', 0, req, total);
    free(req);
    int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
    for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++) signal(forwarded[i], on_signal);
    signal(SIGPIPE, SIG_IGN);
    int cmd_index = -1;
    char **cmd = NULL;
    time_t asked = time(NULL);
    for (;;) {
        struct pollfd pf[1 + 2 * MAX_TASKS];
        struct { struct task *t; int *fd; char type; } who[1 + 2 * MAX_TASKS];
        int n = 0;
        pf[n++] = (struct pollfd){port, POLLIN, 0};
        for (int i = 0; i < MAX_TASKS; i++) {
            if (!tasks[i].used) continue;
            if (tasks[i].out >= 0) { who[n].t = &tasks[i]; who[n].fd = &tasks[i].out; who[n].type = 'O'; pf[n++] = (struct pollfd){tasks[i].out, POLLIN, 0}; }
            if (tasks[i].err >= 0) { who[n].t = &tasks[i]; who[n].fd = &tasks[i].err; who[n].type = 'E'; pf[n++] = (struct pollfd){tasks[i].err, POLLIN, 0}; }
        }
        if (pending_sig) { char s[8]; snprintf(s, sizeof s, "%d", (int)pending_sig); pending_sig = 0; send_frame('G', 0, s, strlen(s)); }
        if (cmd_index < 0 && time(NULL) - asked > 120) {
            fprintf(stderr, "%s: error: vmwrap: the host did not answer the step request in 120 s\n", prog);
            return 1;
        }
        if (poll(pf, (nfds_t)n, 200) < 0) { if (errno == EINTR) continue; perror("poll"); return 1; }
        for (int i = 1; i < n; i++) if (pf[i].revents) pump(who[i].t, who[i].fd, who[i].type);
        reap();
        if (pf[0].revents & POLLIN) {
            ssize_t r = read(port, in + inlen, sizeof in - inlen);
            if (r > 0) inlen += (size_t)r;
            else if (r == 0 || errno != EINTR) nap(50);  /* host not connected: wait for it */
        } else if (pf[0].revents & (POLLHUP | POLLERR)) nap(50);
        char type; uint32_t step; int task; unsigned char *data; size_t len;
        while (next_frame(&type, &step, &task, &data, &len)) {
            if (type == 'B' && cmd_index > 0) {  /* a new payload: this VM was restored while the step ran */
                fprintf(stderr, "%s: error: vmwrap: the step was lost: the job's VM was saved and restored while it ran\n", prog);
                return 1;
            }
            if (step != step_id) { consume(len); continue; }   /* an earlier step's leftovers */
            char text[64] = {0};
            memcpy(text, data, len < sizeof text - 1 ? len : sizeof text - 1);
            if (type == 'A') {
                int k = atoi(text);
                if (k < 0 || k >= argc - 1) { fprintf(stderr, "%s: error: vmwrap: bad answer from the host\n", prog); return 1; }
                cmd_index = k + 1;
                cmd = task_command(argc, argv, cmd_index);
            } else if (type == 'R' && cmd_index > 0) {
                start_task(task, cmd, data, len);
            } else if (type == 'K') {
                int sig = atoi(text);
                for (int i = 0; i < MAX_TASKS; i++)
                    if (tasks[i].used && tasks[i].id == task && sig > 0 && sig < 65) kill(-tasks[i].pid, sig);
            } else if (type == 'S') {
                put_all(1, (const char *)data, len);
            } else if (type == 'T') {
                put_all(2, (const char *)data, len);
            } else if (type == 'Z') {
                int v = atoi(text + (text[0] == 's' ? 7 : 5));
                if (text[0] == 's' && v > 0 && v < 65) {
                    signal(v, SIG_DFL);
                    kill(getpid(), v);
                    nap(500);
                    return 128 + v;
                }
                return v & 255;
            }
            consume(len);
        }
    }
}
