"""The kernel's own multicast forwarding, as the in-kernel reference relay.

    python bench/mrt.py SOURCE GROUP IN_IFACE OUT_IFACE [OUT_IFACE ...]

Programs one (S,G) route with MRT_* socket options (what smcroute does) and
holds it until killed: closing the socket tears the routes down. The kernel
forwards without rewriting, so receivers get GROUP itself.
"""

from __future__ import annotations

import signal
import socket
import struct
import sys

MRT_INIT, MRT_ADD_VIF, MRT_ADD_MFC = 200, 202, 204
VIFF_USE_IFINDEX = 0x8


def main(argv: list[str]) -> int:
    source, group, inbound, *outbound = argv
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IGMP)
    sock.setsockopt(socket.IPPROTO_IP, MRT_INIT, 1)
    ttls = bytearray(32)
    for vif, name in enumerate([inbound, *outbound]):
        # struct vifctl: vifi, flags, threshold, rate_limit, lcl_ifindex, rmt_addr
        vifctl = struct.pack("=HBBIi4s", vif, VIFF_USE_IFINDEX, 1, 0, socket.if_nametoindex(name), b"\0" * 4)
        sock.setsockopt(socket.IPPROTO_IP, MRT_ADD_VIF, vifctl)
        if vif:
            ttls[vif] = 1
    # struct mfcctl: origin, group, parent vif, ttls[32], pkt_cnt, byte_cnt, wrong_if, expire
    mfcctl = struct.pack(
        "4s4sH32sIIIi", socket.inet_aton(source), socket.inet_aton(group), 0, bytes(ttls), 0, 0, 0, 0
    )
    sock.setsockopt(socket.IPPROTO_IP, MRT_ADD_MFC, mfcctl)
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    sock.close()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    sys.exit(main(sys.argv[1:]))
