"""A real HTTP server on 127.0.0.1 serving a channel folder, for the update tests.

It supports ``Range``/``If-Range`` (or ignores them when told to), sends ETags, and
counts the body bytes it sends, so tests can measure what an update transferred.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ChannelServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ignore_range = False
        self.cut_after: int | None = None  # end one longer body cleanly (FIN) after this many bytes
        # Send bodies over 64 KiB (blobs, bundles) as (bytes, then a pause in seconds), again and
        # again: a slow or hostile link.
        self.pace: tuple[int, float] | None = None
        self.bytes_sent = 0
        self.range_requests = 0
        self.requests: list[str] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = (server.root / self.path.lstrip("/").split("?")[0]).resolve()
                with server._lock:
                    server.requests.append(self.path)
                if server.root.resolve() not in path.parents or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                stat = path.stat()
                etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
                start = 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range and rng.startswith("bytes="):
                    if_range = self.headers.get("If-Range")
                    if if_range is None or if_range == etag:
                        start = int(rng[6:].split("-")[0])
                        with server._lock:
                            server.range_requests += 1
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "none" if server.ignore_range else "bytes")
                self.end_headers()
                with server._lock:
                    cut = server.cut_after
                    if cut is not None and len(body) > cut:
                        server.cut_after = None  # once, on the first file longer than that
                        body = body[:cut]  # what a proxy or a mobile link does: a short, clean close
                        self.close_connection = True
                pace = server.pace if len(body) > 64 << 10 else None
                step = pace[0] if pace else len(body)
                for at in range(0, len(body), max(step, 1)):
                    try:
                        self.wfile.write(body[at : at + step])
                        self.wfile.flush()
                    except OSError:
                        return  # the client gave up
                    with server._lock:
                        server.bytes_sent += len(body[at : at + step])
                    if pace:
                        time.sleep(pace[1])

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                # Clients killed mid-download (on purpose, in these tests) reset the connection.
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_sent = 0
            self.range_requests = 0
            self.requests.clear()


@contextmanager
def serve(root: Path) -> Iterator[ChannelServer]:
    server = ChannelServer(root)
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join(timeout=10)
