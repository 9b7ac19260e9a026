"""Servers on 127.0.0.1 that tests read shards from: moto's S3 server, gcp-storage-emulator for GCS, and an HTTP
file server that can cut responses short (moto always sends whole objects, so it cannot show a read that fails
halfway)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.conftest import free_port, running


class FaultyFileServer(ThreadingHTTPServer):
    """Serves the files of `root` with Range support. GET number n (from 1) of a file named in `cut_gets` with n
    in its set, and every GET of a file in `broken`, sends its headers (with the full Content-Length) and then only
    half the body before closing the connection."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _FaultyHandler)
        self.root = root
        self.cut_gets: dict[str, set[int]] = {}
        self.broken: set[str] = set()
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
            number = self.server.gets[path.name]
        cut = path.name in self.server.broken or number in self.server.cut_gets.get(path.name, ())
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


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (stopped on leaving); yields its endpoint URL."""
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with running(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as process:
        _wait_for_port(process, port, "moto's server")
        yield f"http://127.0.0.1:{port}"


def _wait_for_port(process: subprocess.Popen, port: int, name: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, f"{name} exited at start-up"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"{name} did not start within 60 s"
            time.sleep(0.1)


def s3_environment(endpoint: str) -> dict[str, str]:
    """What a user of an S3-compatible store sets: the endpoint and the keys (no ~/.aws files are read)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent/aws/config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws/credentials"}


def upload(endpoint: str, bucket: str, files: dict[str, bytes]) -> None:
    """Put `files` (key -> bytes) into `bucket` (made if missing) with boto3, not with the code under test."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    if bucket not in {entry["Name"] for entry in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)
    for key, data in files.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)


@contextmanager
def gcs_emulator() -> Iterator[str]:
    """gcp-storage-emulator (a pure-Python GCS JSON API) on 127.0.0.1, in memory; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
               "--in-memory"]
    with running(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as process:
        _wait_for_port(process, port, "gcp-storage-emulator")
        yield f"http://127.0.0.1:{port}"


def gcs_upload(emulator: str, bucket: str, files: dict[str, bytes]) -> None:
    """Make `bucket` and put `files` into it through the JSON API with urllib, not with the code under test."""
    request = urllib.request.Request(f"{emulator}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": bucket}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request).close()
    for name, data in files.items():
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        request = urllib.request.Request(f"{emulator}/upload/storage/v1/b/{bucket}/o?{query}", method="POST",
                                         data=data, headers={"Content-Type": "application/octet-stream"})
        urllib.request.urlopen(request).close()
