/* connect() micro-benchmark for `cargo xtask bench` (W4/W7).
 *
 * usage: connbench udp|udpspread|tcp|tcprst ADDR PORT N
 * Does socket() + connect() + close() N times and prints one line:
 *   ns_per_iter=<f> ok=<n> eperm=<n> other=<n> per_sec=<f>
 * connect() on a UDP socket sends nothing, so the udp mode measures the syscall plus the
 * cgroup/connect4 hook; the tcp mode is meant for a destination the policy refuses (EPERM
 * at once, no packet). The tcprst mode connects TCP to a listening socket (the full loopback
 * handshake) and closes with SO_LINGER 0 (an RST, no TIME_WAIT, so the ports never run out):
 * W4's iptables REDIRECT rows, where the nat rule only runs on a packet. The udpspread mode is
 * the udp mode to 65,536 addresses in turn (ADDR's last two bytes count up), so that no
 * connect() finds its destination's verdict cached: the hook's full judgment. Build: gcc -O2 -o connbench connbench.c
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s udp|udpspread|tcp|tcprst ADDR PORT N\n", argv[0]);
    return 2;
  }
  int spread = strcmp(argv[1], "udpspread") == 0;
  int udp = spread || strcmp(argv[1], "udp") == 0;
  int rst = strcmp(argv[1], "tcprst") == 0;
  struct linger lg = {1, 0};
  struct sockaddr_in sa;
  memset(&sa, 0, sizeof sa);
  sa.sin_family = AF_INET;
  sa.sin_port = htons((unsigned short)atoi(argv[3]));
  if (inet_pton(AF_INET, argv[2], &sa.sin_addr) != 1) {
    fprintf(stderr, "bad address %s\n", argv[2]);
    return 2;
  }
  long n = atol(argv[4]), ok = 0, eperm = 0, other = 0;
  uint32_t base = ntohl(sa.sin_addr.s_addr) & 0xffff0000u;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long i = 0; i < n; i++) {
    int fd = socket(AF_INET, udp ? SOCK_DGRAM : SOCK_STREAM, 0);
    if (fd < 0) {
      perror("socket");
      return 1;
    }
    if (rst && setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) != 0) {
      perror("setsockopt");
      return 1;
    }
    if (spread)
      sa.sin_addr.s_addr = htonl(base | (uint32_t)(i & 0xffff));
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
      ok++;
    else if (errno == EPERM)
      eperm++;
    else
      other++;
    close(fd);
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double ns = (double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec);
  printf("ns_per_iter=%.1f ok=%ld eperm=%ld other=%ld per_sec=%.0f\n", ns / (double)n, ok, eperm,
         other, (double)n * 1e9 / ns);
  return 0;
}
