#!/usr/bin/env python3
"""Packets that skip the socket hooks, and a sniffer to see whether they arrive.

  packets.py syn DST PORT          a TCP SYN from a raw socket (IPv4 or IPv6)
  packets.py echo DST              an ICMP (or ICMPv6) echo request from a raw socket
  packets.py raw4|raw6 DST HEX    a whole IP packet (header included) from an IPPROTO_RAW socket
  packets.py frame IFACE MAC TYPE HEX  an Ethernet frame to MAC (ethertype TYPE, hex) on IFACE
  packets.py sniff IFACE DST SECS  prints how many IP packets to DST crossed IFACE
"""
import socket
import struct
import sys
import time


def syn(dst, port):
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_TCP)
    # The kernel fills in the IP header and (for IPv6) the checksum is ours to give; the
    # receiver of a bad checksum still counts the packet on the wire, which is all we need.
    hdr = struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    s.sendto(hdr, (dst, 0))
    print("sent")


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def echo(dst):
    if ":" in dst:
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        pkt = struct.pack("!BBHHH", 128, 0, 0, 0x4567, 1) + b"egress"  # kernel sums ICMPv6
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        body = struct.pack("!BBHHH", 8, 0, 0, 0x4567, 1) + b"egress"
        pkt = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    s.sendto(pkt, (dst, 0))
    print("sent")


def sniff(iface, dst, secs):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((iface, 0))
    s.settimeout(0.2)
    want4 = socket.inet_pton(socket.AF_INET6 if ":" in dst else socket.AF_INET, dst)
    seen = 0
    print("ready", flush=True)
    end = time.time() + secs
    while time.time() < end:
        try:
            pkt = s.recv(65535)
        except socket.timeout:
            continue
        eth = struct.unpack("!H", pkt[12:14])[0]
        if eth == 0x0800 and pkt[30:34] == want4:
            seen += 1
        elif eth == 0x86DD and pkt[38:54] == want4:
            seen += 1
    print(seen, flush=True)


def raw(family, dst, hexpkt):
    """Sends a whole IP packet (header included, as given: any source, any extension
    headers) from an IPPROTO_RAW socket."""
    s = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.sendto(bytes.fromhex(hexpkt), (dst, 0))
    print("sent")


def frame(iface, dstmac, ethertype, hexpkt):
    """Sends an IP packet in an Ethernet frame of our own on IFACE (AF_PACKET): it leaves
    even when its destination is a local address."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    with open("/sys/class/net/%s/address" % iface) as f:
        src = bytes.fromhex(f.read().strip().replace(":", ""))
    dst = bytes.fromhex(dstmac.replace(":", ""))
    s.send(dst + src + struct.pack("!H", int(ethertype, 16)) + bytes.fromhex(hexpkt))
    print("sent")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "frame":
        frame(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    elif cmd == "raw4":
        raw(socket.AF_INET, sys.argv[2], sys.argv[3])
    elif cmd == "raw6":
        raw(socket.AF_INET6, sys.argv[2], sys.argv[3])
    if cmd == "syn":
        syn(sys.argv[2], int(sys.argv[3]))
    elif cmd == "echo":
        echo(sys.argv[2])
    elif cmd == "sniff":
        sniff(sys.argv[2], sys.argv[3], float(sys.argv[4]))
