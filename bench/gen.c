/* Traffic generator for mcrd's benchmark: UDP datagrams at a fixed rate.
 *
 *   gen GROUP PORT SIZE PPS SECONDS IFNAME [TTL]
 *
 * Sends SIZE-byte payloads to GROUP:PORT out of IFNAME at PPS datagrams per
 * second for SECONDS, in sendmmsg batches paced every 100 us, and prints the
 * number sent and the rate achieved. Built by bench/run.py with cc -O2.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: gen GROUP PORT SIZE PPS SECONDS IFNAME [TTL]\n");
        return 2;
    }
    const char *group = argv[1];
    int port = atoi(argv[2]), size = atoi(argv[3]);
    double pps = atof(argv[4]), seconds = atof(argv[5]);
    int ttl = argc > 7 ? atoi(argv[7]) : 8;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) { perror("socket"); return 1; }
    struct ip_mreqn mreq = {0};
    mreq.imr_ifindex = if_nametoindex(argv[6]);
    if (!mreq.imr_ifindex) { perror("if_nametoindex"); return 1; }
    setsockopt(fd, IPPROTO_IP, IP_MULTICAST_IF, &mreq, sizeof mreq);
    setsockopt(fd, IPPROTO_IP, IP_MULTICAST_TTL, &ttl, sizeof ttl);
    setsockopt(fd, IPPROTO_IP, IP_TTL, &ttl, sizeof ttl);
    setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, argv[6], strlen(argv[6]));
    int sndbuf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf);
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, group, &dst.sin_addr);
    char *payload = calloc(BATCH, size);
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = payload + (size_t)i * size;
        iov[i].iov_len = size;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &dst;
        msgs[i].msg_hdr.msg_namelen = sizeof dst;
    }
    double start = now(), end = start + seconds;
    uint64_t sent = 0;
    for (;;) {
        double t = now();
        if (t >= end) break;
        uint64_t due = (uint64_t)((t - start) * pps);
        while (sent < due) {
            int n = due - sent > BATCH ? BATCH : (int)(due - sent);
            for (int i = 0; i < n; i++) {
                uint64_t seq = sent + i;
                memcpy(payload + (size_t)i * size, &seq, size >= 8 ? 8 : size);
            }
            int r = sendmmsg(fd, msgs, n, 0);
            if (r <= 0) break; /* queue full: the generator is the limit */
            sent += r;
        }
        struct timespec pause = {0, 100000};
        nanosleep(&pause, NULL);
    }
    double took = now() - start;
    printf("%llu %.0f\n", (unsigned long long)sent, sent / took);
    return 0;
}
