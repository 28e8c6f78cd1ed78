// noprog CGROUP_DIR: what the kernel's per-program accounting (kernel.bpf_stats_enabled) adds
// to every run, measured with programs that do nothing. Loads two 2-instruction programs
// (r0 = 1; exit): `noop_sock_crt` (cgroup/sock_create) and `noop_connect4` (cgroup/connect4),
// both passing everything, attaches them to CGROUP_DIR by bpf links (beside the programs
// already there), prints "ready", and waits until its stdin closes. The links close with the
// process: nothing stays attached after it exits, however it ends.
#include <linux/bpf.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static int bpf(int cmd, union bpf_attr *attr) {
    return syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

static int load(enum bpf_prog_type type, enum bpf_attach_type at, const char *name) {
    struct bpf_insn insns[2] = {
        {.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_0, .imm = 1},
        {.code = BPF_JMP | BPF_EXIT},
    };
    union bpf_attr a;
    memset(&a, 0, sizeof(a));
    a.prog_type = type;
    a.expected_attach_type = at;
    a.insn_cnt = 2;
    a.insns = (unsigned long)insns;
    a.license = (unsigned long)"GPL";
    strncpy(a.prog_name, name, sizeof(a.prog_name) - 1);
    return bpf(BPF_PROG_LOAD, &a);
}

static int attach(int prog, int cg, enum bpf_attach_type at) {
    union bpf_attr a;
    memset(&a, 0, sizeof(a));
    a.link_create.prog_fd = prog;
    a.link_create.target_fd = cg;
    a.link_create.attach_type = at;
    return bpf(BPF_LINK_CREATE, &a);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: noprog CGROUP_DIR\n");
        return 2;
    }
    int cg = open(argv[1], O_RDONLY | O_DIRECTORY);
    if (cg < 0) {
        perror(argv[1]);
        return 1;
    }
    int create = load(BPF_PROG_TYPE_CGROUP_SOCK, BPF_CGROUP_INET_SOCK_CREATE, "noop_sock_crt");
    int connect4 = load(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT, "noop_connect4");
    if (create < 0 || connect4 < 0) {
        perror("load");
        return 1;
    }
    if (attach(create, cg, BPF_CGROUP_INET_SOCK_CREATE) < 0 ||
        attach(connect4, cg, BPF_CGROUP_INET4_CONNECT) < 0) {
        perror("attach");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    char buf[64];
    while (read(0, buf, sizeof(buf)) > 0) {
    }
    return 0;
}
