"""Servers on 127.0.0.1 that tests read shards from: moto's S3 server, and an HTTP file server that can cut
responses short (moto always sends whole objects, so it cannot show a read that fails halfway)."""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FaultyFileServer(ThreadingHTTPServer):
    """Serves the files of `root` with Range support. `cuts[name]` GET responses for a file send their headers
    (with the full Content-Length) and then only half the body before closing; -1 cuts every one."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _FaultyHandler)
        self.root = root
        self.cuts: Counter = Counter()
        self.gets: Counter = Counter()  # GET requests per file name
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _FaultyHandler(BaseHTTPRequestHandler):
    server: FaultyFileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: pytest shows failures, not every request
        pass

    def _file(self) -> Path | None:
        path = self.server.root / self.path.lstrip("/").split("?")[0]
        return path if path.is_file() else None

    def do_HEAD(self) -> None:
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end = 0, len(data) - 1
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start = int(match[1])
            end = min(int(match[2]), end) if match[2] else end
        body = data[start:end + 1]
        with self.server.lock:
            self.server.gets[path.name] += 1
            cut = self.server.cuts[path.name] != 0
            if self.server.cuts[path.name] > 0:
                self.server.cuts[path.name] -= 1
        self.send_response(206 if match else 200)
        if match:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if cut:
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@contextmanager
def faulty_file_server(root: Path) -> Iterator[FaultyFileServer]:
    server = FaultyFileServer(root)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
