#!/usr/bin/env python3
"""Lab client: opens one new TCP connection per source address and reports who answered.
IPv4 or IPv6, by the VIP's form.

Usage:
  client.py once VIP PORT SRC...          one round; prints JSON {src: host|"FAIL:reason"}
  client.py probe VIP PORT MS SRC...      every MS ms, one connection from each SRC
                                          (round robin); prints one line per probe:
                                          "<monotonic_ms> <src> <host|FAIL>"
"""
import json
import socket
import sys
import time


def ask(vip, port, src, timeout=0.5):
    s = socket.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.bind((src, 0))
        s.connect((vip, port))
        data = s.recv(64)
        return data.decode().strip() or "FAIL:empty"
    except ConnectionRefusedError:
        return "FAIL:reset"
    except OSError as e:
        return f"FAIL:{type(e).__name__}"
    finally:
        s.close()


def main():
    mode, vip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "once":
        print(json.dumps({src: ask(vip, port, src) for src in sys.argv[4:]}))
    elif mode == "probe":
        every = int(sys.argv[4]) / 1000.0
        srcs = sys.argv[5:]
        i = 0
        while True:
            t = time.monotonic()
            src = srcs[i % len(srcs)]
            print(f"{int(t * 1000)} {src} {ask(vip, port, src, timeout=every * 20)}", flush=True)
            i += 1
            time.sleep(max(0.0, every - (time.monotonic() - t)))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
