/* Traffic generator for mcrd's benchmark: UDP datagrams at a fixed rate.
 *
 *   gen GROUP PORT SIZE PPS SECONDS IFNAME [TTL]
 *
 * Sends SIZE-byte payloads to GROUP:PORT out of IFNAME at PPS datagrams per
 * second for SECONDS, paced every 100 us, and prints the number sent and the
 * rate achieved. Each payload starts with its 8-byte sequence number.
 *
 * Runs of up to 64 datagrams leave in one sendmsg with UDP GSO (UDP_SEGMENT):
 * the kernel cuts them into datagrams at the interface (the harness turns
 * the veth's UDP segmentation offload off, so that they cross it one by
 * one). That costs a fraction of a system call or a packet-socket send per
 * datagram: on the development machine this reaches about 1.2 million
 * datagrams/s on one core, where sendmmsg on a packet socket stopped near
 * 450,000. Built by bench/run.py with cc -O2.
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

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif

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
    int port = atoi(argv[2]), size = atoi(argv[3]);
    double pps = atof(argv[4]), seconds = atof(argv[5]);
    int ttl = argc > 7 ? atoi(argv[7]) : 8;
    if (size < 8 || size > 1472) {
        fprintf(stderr, "gen: SIZE must be 8..1472\n");
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) { perror("socket"); return 1; }
    struct ip_mreqn mreq = {0};
    mreq.imr_ifindex = (int)if_nametoindex(argv[6]);
    if (!mreq.imr_ifindex) { perror("if_nametoindex"); return 1; }
    setsockopt(fd, IPPROTO_IP, IP_MULTICAST_IF, &mreq, sizeof mreq);
    setsockopt(fd, IPPROTO_IP, IP_MULTICAST_TTL, &ttl, sizeof ttl);
    setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, argv[6], strlen(argv[6]));
    int sndbuf = 8 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf);
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, argv[1], &dst.sin_addr) != 1) { fprintf(stderr, "gen: bad group\n"); return 2; }

    int per = 65000 / size;
    if (per > 64) per = 64;
    char *payload = calloc((size_t)per, (size_t)size);
    union {
        char buf[CMSG_SPACE(sizeof(uint16_t))];
        struct cmsghdr align;
    } control;
    double start = now(), end = start + seconds;
    uint64_t sent = 0;
    for (;;) {
        double t = now();
        if (t >= end) break;
        uint64_t due = (uint64_t)((t - start) * pps);
        while (sent < due) {
            int n = due - sent > (uint64_t)per ? per : (int)(due - sent);
            for (int i = 0; i < n; i++) {
                uint64_t seq = sent + (uint64_t)i;
                memcpy(payload + (size_t)i * size, &seq, 8);
            }
            struct iovec iov = {payload, (size_t)n * size};
            struct msghdr msg = {.msg_name = &dst, .msg_namelen = sizeof dst, .msg_iov = &iov, .msg_iovlen = 1};
            if (n > 1) {
                msg.msg_control = control.buf;
                msg.msg_controllen = sizeof control.buf;
                struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
                c->cmsg_level = SOL_UDP;
                c->cmsg_type = UDP_SEGMENT;
                c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
                uint16_t gso = (uint16_t)size;
                memcpy(CMSG_DATA(c), &gso, sizeof gso);
            }
            if (sendmsg(fd, &msg, MSG_DONTWAIT) < 0) break; /* queue full: the generator is the limit */
            sent += (uint64_t)n;
        }
        struct timespec pause = {0, 100000};
        nanosleep(&pause, NULL);
    }
    double took = now() - start;
    printf("%llu %.0f\n", (unsigned long long)sent, sent / took);
    return 0;
}
