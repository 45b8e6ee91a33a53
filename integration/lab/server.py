#!/usr/bin/env python3
"""Tiny TCP server for the lab: answers every connection with this host's name.

Usage: server.py NAME ADDR PORT. A line received is echoed back prefixed with the
name, so long-lived connections can show which host keeps serving them. ADDR "::"
serves IPv4 and IPv6.
"""
import socket
import sys
import threading


def serve(conn, name):
    with conn:
        conn.sendall(f"{name}\n".encode())
        try:
            for line in conn.makefile("rb"):
                conn.sendall(name.encode() + b" " + line)
        except OSError:
            pass


def main():
    name, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((addr, port))
    s.listen(512)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve, args=(conn, name), daemon=True).start()


if __name__ == "__main__":
    main()
