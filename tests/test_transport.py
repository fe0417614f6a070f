"""Image transports: HTTP with resume against a real (loopback) server that breaks connections."""

import hashlib
import http.server
import os
import socket
import threading

import pytest

from vmwrap import transport
from vmwrap.cache import Cache
from vmwrap.catalog import Artifact
from vmwrap.errors import ImageError

DATA = os.urandom(3 * 1024 * 1024 + 17)


class Flaky(http.server.BaseHTTPRequestHandler):
    """Serves DATA; the first `breaks` responses stop after 1 MiB while announcing the full length."""

    breaks = 0
    honour_range = True
    requests: list[str] = []

    def do_GET(self):
        Flaky.requests.append(self.headers.get("Range", "-"))
        if self.path == "/missing":
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and Flaky.honour_range:
            start = int(rng.split("=")[1].rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
        else:
            self.send_response(200)
        body = DATA[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if Flaky.breaks > 0:
            Flaky.breaks -= 1
            self.wfile.write(body[: 1 << 20])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # clients that hang up on purpose are the point of these tests

    srv = Server(("127.0.0.1", 0), Flaky)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    Flaky.requests = []
    Flaky.honour_range = True
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def art(url):
    return Artifact(url + "/image", hashlib.sha256(DATA).hexdigest(), len(DATA))


def test_broken_transfers_resume_and_end_in_the_checksum(server, tmp_path):
    Flaky.breaks = 2
    got = Cache(tmp_path / "c", 1 << 30).fetch(art(server))
    assert got.path.read_bytes() == DATA and got.bytes_transferred == len(DATA)
    assert Flaky.requests == ["-", "bytes=1048576-", "bytes=2097152-"]


def test_server_ignoring_range_is_a_clear_error_and_leaves_nothing(server, tmp_path):
    Flaky.breaks, Flaky.honour_range = 1, False
    with pytest.raises(ImageError, match="server ignored the Range request"):
        Cache(tmp_path / "c", 1 << 30).fetch(art(server))
    assert os.listdir(tmp_path / "c" / "tmp") == [] and os.listdir(tmp_path / "c" / "blobs") == []


def test_http_error_and_unreachable_url(server, tmp_path):
    c = Cache(tmp_path / "c", 1 << 30)
    with pytest.raises(ImageError, match="HTTP 404"):
        c.fetch(Artifact(server + "/missing", "a" * 64, 10))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with pytest.raises(ImageError, match="cannot fetch image http://127.0.0.1"):
        c.fetch(Artifact(f"http://127.0.0.1:{closed_port}/x", "a" * 64, 10))
    assert os.listdir(tmp_path / "c" / "tmp") == []


def test_corrupt_source_over_http(server, tmp_path):
    with pytest.raises(ImageError, match="checksum mismatch"):
        Cache(tmp_path / "c", 1 << 30).fetch(Artifact(server + "/image", "b" * 64, len(DATA)))


def test_site_transport_plugin(tmp_path):
    import io

    transport.register("mem", lambda src: io.BytesIO(DATA))
    try:
        got = Cache(tmp_path / "c", 1 << 30).fetch(Artifact("mem://bucket/image", hashlib.sha256(DATA).hexdigest(), len(DATA)))
        assert got.path.read_bytes() == DATA
    finally:
        del transport.TRANSPORTS["mem"]
    with pytest.raises(ImageError, match=r"no transport for mem://"):
        Cache(tmp_path / "c2", 1 << 30).fetch(Artifact("mem://x", "a" * 64, 1))
