"""Probe a guest's network from the host: an HTTP server that records which uid each client socket
belongs to (the job's QEMU runs as the job's user), and the guest command that fetches from it."""

from __future__ import annotations

import http.server
import socket
import threading
from pathlib import Path


def get(host: str, port, path: str) -> str:
    """A guest command printing the body of GET /path (busybox nc: the static busybox's wget crashes in
    glibc's name-service lookups, which its root has no libraries for)."""
    return f"printf 'GET /{path} HTTP/1.0\\r\\n\\r\\n' | nc -w 20 {host} {port} | tail -n 1\n"


def _hex(ip: str, port: int) -> str:
    return f"{socket.inet_aton(ip)[::-1].hex().upper()}:{port:04X}"


def socket_owner(ip: str, port: int, peer: tuple[str, int]) -> int | None:
    """The uid owning the live TCP socket ip:port -> peer (/proc/net/tcp), None if there is none.

    Both ends are matched and TIME_WAIT entries (state 06, uid 0) skipped: an earlier connection from the
    same local port to another peer may linger there."""
    local, remote = _hex(ip, port), _hex(*peer)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == local and f[2] == remote and f[3] != "06":
            return int(f[7])
    return None


class Host:
    """An HTTP server on the host: answers GET /NAME with "got NAME" and records each client's uid."""

    def __init__(self):
        seen = self.seen = []

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append((self.path, socket_owner(*self.client_address[:2], self.connection.getsockname()[:2])))
                body = f"got {self.path.strip('/')}\n".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.srv = http.server.ThreadingHTTPServer(("0.0.0.0", 0), H)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def host_ip() -> str | None:
    """This host's address on its default route, if it has one (the NAT's way out to the host network)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route
        ip = s.getsockname()[0]
        return None if ip.startswith("127.") else ip
    except OSError:
        return None
    finally:
        s.close()
