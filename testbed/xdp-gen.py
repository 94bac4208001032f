#!/usr/bin/env python3
"""An XDP frame generator for the forwarding benchmark: the kernel itself sends frames out of IFACE as fast as it can (BPF_PROG_TEST_RUN with live frames, XDP_TX), without a socket buffer per frame — several times what an AF_PACKET sender offers on one core.

Usage: xdp-gen.py IFACE DST_MAC SIZE SECONDS
Prints "frames seconds". SECONDS 0: one frame, to learn whether the kernel
lets this process send live frames (exit 1 with the reason if not). Frames: IPv4 TCP ACKs from 203.0.113.7 to
198.51.100.10:443, the source port drawn per frame from 4,096 values (the
program rewrites it), padded to SIZE bytes. The receiving veth needs a
NAPI instance (an XDP program, or GRO on). Root only; sends only on IFACE.
"""
import ctypes
import os
import socket
import struct
import sys
import time

SYS_BPF = 321  # x86_64
BPF_PROG_LOAD, BPF_PROG_TEST_RUN = 5, 10
BPF_PROG_TYPE_XDP, BPF_XDP = 6, 37
BPF_F_TEST_XDP_LIVE_FRAMES = 2
XDP_TX = 3
BATCH = int(os.environ.get("XDP_GEN_BATCH", "2000000"))  # frames per test run (each costs ~25 ms to set up)

libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr.ljust(160, b"\0"), 160)
    if libc.syscall(SYS_BPF, cmd, buf, 160) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def insn(op, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", op, dst | (src << 4), off, imm)


def program(dst_mac):
    """Per frame: the destination MAC written again (the receiver may have
    rewritten it: live frames share their pages along the path), the TCP
    source port (offset 34) drawn from 4,096 values; XDP_TX."""
    mac_lo = struct.unpack("<i", dst_mac[:4])[0]
    mac_hi = struct.unpack("<h", dst_mac[4:6])[0]
    return b"".join([
        insn(0xBF, 6, 1),               # r6 = ctx
        insn(0x85, imm=7),              # r0 = bpf_get_prandom_u32()
        insn(0x57, 0, imm=0x0FFF),      # r0 &= 0xfff
        insn(0x47, 0, imm=0x8000),      # r0 |= 0x8000
        insn(0xDC, 0, imm=16),          # r0 = htons(r0)
        insn(0x61, 2, 6, 0),            # r2 = ctx->data
        insn(0x61, 3, 6, 4),            # r3 = ctx->data_end
        insn(0xBF, 1, 2),               # r1 = r2
        insn(0x07, 1, imm=36),          # r1 += 36
        insn(0x2D, 1, 3, 3),            # if r1 > r3: skip the stores
        insn(0x6B, 2, 0, 34),           # *(u16 *)(r2 + 34) = r0
        insn(0x62, 2, 0, 0, mac_lo),    # *(u32 *)(r2 + 0) = dst MAC[0..4]
        insn(0x6A, 2, 0, 4, mac_hi),    # *(u16 *)(r2 + 4) = dst MAC[4..6]
        insn(0xB7, 0, imm=XDP_TX),      # return XDP_TX
        insn(0x95),
    ])


def frame(dst_mac, size):
    src_mac = bytes.fromhex("02eeeeeeee07")
    ip_len = max(size, 54) - 14
    tcp = struct.pack("!HHIIBBHHH", 40000, 443, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, 0, 0x4000, 64, 6, 0,
                     socket.inet_aton("203.0.113.7"), socket.inet_aton("198.51.100.10"))
    s = sum(struct.unpack("!10H", ip))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    ip = ip[:10] + struct.pack("!H", ~s & 0xFFFF) + ip[12:]
    f = dst_mac + src_mac + b"\x08\x00" + ip + tcp
    return f.ljust(max(size, 60), b"\0")


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    iface, dst, size, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    ifindex = socket.if_nametoindex(iface)
    dst_mac = bytes.fromhex(dst.replace(":", ""))
    code = program(dst_mac)
    prog = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = struct.pack("<IIQQIIQII16sII", BPF_PROG_TYPE_XDP, len(code) // 8,
                       ctypes.addressof(prog), ctypes.addressof(lic), 0, 0, 0, 0, 0,
                       b"std_xdp_gen", 0, BPF_XDP)
    buf = ctypes.create_string_buffer(attr.ljust(160, b"\0"), 160)
    fd = libc.syscall(SYS_BPF, BPF_PROG_LOAD, buf, 160)
    if fd < 0:
        e = ctypes.get_errno()
        sys.exit(f"xdp-gen: loading the program: {os.strerror(e)}")
    data = frame(dst_mac, size)
    data_buf = ctypes.create_string_buffer(data, len(data))
    ctx = struct.pack("<IIIIII", 0, len(data), 0, ifindex, 0, 0)
    ctx_buf = ctypes.create_string_buffer(ctx, len(ctx))
    run = struct.pack("<IIIIQQIIIIQQIII", fd, 0, len(data), 0, ctypes.addressof(data_buf), 0,
                      BATCH, 0, len(ctx), 0, ctypes.addressof(ctx_buf), 0,
                      BPF_F_TEST_XDP_LIVE_FRAMES, 0, 256)
    if seconds == 0:  # a probe: can this kernel send live frames here?
        probe = run[:32] + struct.pack("<I", 1) + run[36:]  # repeat = 1
        try:
            bpf(BPF_PROG_TEST_RUN, probe)
        except OSError as e:
            sys.exit(f"xdp-gen: BPF_PROG_TEST_RUN with live frames: {e.strerror}")
        return
    sent, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        bpf(BPF_PROG_TEST_RUN, run)
        sent += BATCH
    print(sent, f"{time.monotonic() - start:.3f}")


if __name__ == "__main__":
    main()
