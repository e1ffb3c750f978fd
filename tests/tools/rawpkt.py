#!/usr/bin/env python3
"""Raw IPv4 packets on a device, for end-to-end tests that need packets no
socket API sends: trailing padding after the IP total length, a RST at a
chosen sequence number. Sends with an AF_PACKET socket on the device (on a
TUN device that hands the packet to the program reading it, as the kernel
would), and sniffs the device the same way. Run inside the namespace
(`ip netns exec NS python3 rawpkt.py ...`). Prints one line of what it did.

  udp DEV SRC SPORT DST DPORT TEXT PAD      a UDP datagram + PAD zero bytes
  syn DEV SRC SPORT DST DPORT PAD           a SYN + PAD zero bytes; waits
                                            3 s for the SYN-ACK, prints it
  rst DEV SRC SPORT DST DPORT DELTA         waits for the next segment
                                            SRC:SPORT -> DST:DPORT, then
                                            sends a RST at its end + DELTA
"""
import os
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip(src, dst, proto, payload):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0x1234, 0x4000, 64, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


def l4sum(src, dst, proto, seg):
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, len(seg))
    return csum(pseudo + seg)


def udp(src, sport, dst, dport, data):
    seg = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    c = l4sum(src, dst, 17, seg) or 0xFFFF
    return ip(src, dst, 17, seg[:6] + struct.pack("!H", c) + seg[8:])


def tcp(src, sport, dst, dport, seq, ack, flags, window=0):
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, window, 0, 0)
    c = l4sum(src, dst, 6, seg)
    return ip(src, dst, 6, seg[:16] + struct.pack("!H", c) + seg[18:])


def send(dev, pkt):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    s.sendto(pkt, (dev, ETH_P_IP))
    s.close()


def tap(dev):
    """A socket that sees every packet on DEV from now on, both ways."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((dev, 0))
    s.settimeout(0.2)
    return s


def sniff(s, want, secs):
    """The first TCP segment on tap S for which want(fields) holds."""
    end = time.time() + secs
    while time.time() < end:
        try:
            p = s.recv(65535)
        except socket.timeout:
            continue
        if os.environ.get("RAWPKT_DEBUG"):
            print("seen", len(p), p[:24].hex(), file=sys.stderr)
        if len(p) < 40 or p[0] >> 4 != 4 or p[9] != 6:
            continue
        ihl = (p[0] & 15) * 4
        total = struct.unpack("!H", p[2:4])[0]
        sport, dport, seq, ack, off, flags = struct.unpack("!HHIIBB", p[ihl:ihl + 14])
        f = dict(src=socket.inet_ntoa(p[12:16]), dst=socket.inet_ntoa(p[16:20]), sport=sport, dport=dport,
                 seq=seq, ack=ack, flags=flags, len=total - ihl - (off >> 4) * 4)
        if want(f):
            return f
    return None


def main(a):
    mode, dev = a[0], a[1]
    if mode == "udp":
        src, sport, dst, dport, text, pad = a[2], int(a[3]), a[4], int(a[5]), a[6].encode(), int(a[7])
        send(dev, udp(src, sport, dst, dport, text) + b"\0" * pad)
        print("sent udp", len(text) + 28, "+", pad)
    elif mode == "syn":
        src, sport, dst, dport, pad = a[2], int(a[3]), a[4], int(a[5]), int(a[6])
        t = tap(dev)
        send(dev, tcp(src, sport, dst, dport, 4242, 0, 0x02, 64240) + b"\0" * pad)
        f = sniff(t, lambda f: f["sport"] == dport and f["dport"] == sport and f["flags"] & 0x12 == 0x12, 3)
        print("synack" if f else "no synack", f or "")
    elif mode == "rst":
        src, sport, dst, dport, delta = a[2], int(a[3]), a[4], int(a[5]), int(a[6])
        t = tap(dev)
        print("ready", flush=True)
        f = sniff(t, lambda f: (f["src"], f["sport"], f["dst"]) == (src, sport, dst)
                  and (dport == 0 or f["dport"] == dport) and f["len"] > 0, 10)
        if not f:
            print("no segment")
            return 1
        nxt = (f["seq"] + f["len"]) & 0xFFFFFFFF
        seq = (nxt + delta) & 0xFFFFFFFF
        send(dev, tcp(src, sport, dst, f["dport"], seq, f["ack"], 0x14))
        print("rst seq", seq, "next", nxt)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
