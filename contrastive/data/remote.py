"""Shards in object stores and on web servers (s3://, gs://, http(s)://), read through fsspec's clients.

S3 and S3-compatible stores (MinIO, R2, Ceph) go through s3fs, GCS through gcsfs, http(s) through aiohttp: the
`s3` extra (`pip install 'contrastive[s3]'`). Credentials and endpoints are the clients' own standard ones: for S3
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE or ~/.aws/credentials, and AWS_ENDPOINT_URL for a store
other than AWS; for GCS GOOGLE_APPLICATION_CREDENTIALS or gcloud's application-default login.

Each process makes its own client on first use: a client made before a fork (its event-loop thread, its
connection pool) does not work in the child, so every DataLoader worker gets a fresh one. A shard is read front to
back in blocks of READ_BLOCK_BYTES; a read that fails is retried with backoff, from the same offset, on a freshly
opened file. A read that a retry fixed is counted as `recovered_read`; one that fails every try ends the shard,
which the reader counts as lost.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
from collections import Counter
from dataclasses import dataclass

import fsspec

from contrastive.errors import ConfigError, InputError

log = logging.getLogger(__name__)

REMOTE_PROTOCOLS = ("s3", "gs", "gcs", "http", "https")
LISTABLE_PROTOCOLS = ("s3", "gs", "gcs")  # http(s) servers cannot be listed: name every shard
READ_BLOCK_BYTES = 8 << 20
RECOVERED_READ = "recovered_read"
# {"samples": {shard file name: samples}} beside the shards, written by `contrastive-data inspect --write-stats`
STATS_FILE = "_stats.json"
# Not worth another try: the object or the permission is not there.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ConfigError)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries per read, the first included
    first_wait_s: float = 0.5  # before the second try; doubled before each further one, up to MAX_WAIT_S
    MAX_WAIT_S = 30.0

    def wait_before(self, attempt: int) -> float:
        """Seconds to wait before try number `attempt` (2, 3, ...)."""
        return min(self.MAX_WAIT_S, self.first_wait_s * 2 ** (attempt - 2))


DEFAULT_RETRY = RetryPolicy()


def protocol_of(url: str) -> str | None:
    """'s3' for s3://..., None for a local path, a pipe: command or a scheme we do not read."""
    head, separator, _ = url.partition("://")
    return head.lower() if separator and head.lower() in REMOTE_PROTOCOLS else None


_clients: dict[str, fsspec.AbstractFileSystem] = {}
_clients_pid = os.getpid()


def filesystem(protocol: str) -> fsspec.AbstractFileSystem:
    """This process's client for `protocol`, made on first use."""
    global _clients_pid
    if _clients_pid != os.getpid():  # forked: the parent's clients belong to the parent
        _clients.clear()
        _clients_pid = os.getpid()
    if protocol not in _clients:
        try:
            _clients[protocol] = fsspec.filesystem(protocol, skip_instance_cache=True)
        except ImportError as error:
            raise ConfigError(f"{protocol}:// shards need the object-store clients: pip install 'contrastive[s3]' "
                              f"({error})") from error
    return _clients[protocol]


def list_shards(prefix: str) -> list[str]:
    """Every .tar directly under an s3:// or gs:// prefix given like a directory; names a missing bucket."""
    protocol = protocol_of(prefix)
    if protocol not in LISTABLE_PROTOCOLS:
        raise InputError(f"{prefix!r}: only s3:// and gs:// prefixes can be listed; name {protocol}:// shards one by "
                         f"one or with a brace pattern")
    client = filesystem(protocol)
    found = client.glob(prefix.rstrip("/") + "/*.tar")
    if not found:
        bucket = client.split_path(prefix)[0]
        try:
            client.info(bucket)
        except FileNotFoundError as error:
            raise InputError(f"{prefix!r}: bucket {bucket!r} does not exist") from error
        except Exception as error:  # no credentials, no permission, no endpoint: one line, whatever the client raised
            raise InputError(f"{prefix!r}: bucket {bucket!r} cannot be read: {type(error).__name__}: "
                             f"{error}") from error
        raise InputError(f"{prefix!r} holds no .tar shards")
    return [client.unstrip_protocol(path) for path in found]


def check_remote_shards_readable(urls: list[str], source_name: str) -> None:
    """The first shard of every bucket or server is there and readable with the credentials at hand, checked before
    any compute (one request each; the rest are found missing as they are read, and counted)."""
    firsts: dict[str, str] = {}  # bucket or host -> its first shard
    for url in urls:
        if protocol_of(url) is not None:
            firsts.setdefault("/".join(url.split("/")[:3]), url)
    for url in firsts.values():
        protocol = protocol_of(url)
        try:
            filesystem(protocol).info(url)
        except ConfigError:
            raise
        except Exception as error:  # missing bucket or object, no credentials, no endpoint: one line, whatever raised
            raise InputError(f"data source {source_name!r}: {url} cannot be read: {type(error).__name__}: "
                             f"{error}".rstrip()) from error


class RemoteShard:
    """A remote object read front to back (what tarfile's stream mode needs), every read retried per `retry`."""

    def __init__(self, url: str, retry: RetryPolicy, counts: Counter) -> None:
        self.url = url
        self.retry = retry
        self.counts = counts  # gets RECOVERED_READ
        self.client = filesystem(protocol_of(url))
        self.position = 0
        self.file = None
        self._retrying(self._file)  # open now: a missing object fails here, before any read

    def _file(self):
        if self.file is None:
            self.file = self.client.open(self.url, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead")
            self.file.seek(self.position)
        return self.file

    def read(self, size: int = -1) -> bytes:
        data = self._retrying(lambda: self._file().read(size))
        self.position += len(data)
        return data

    def _retrying(self, action):
        for attempt in range(1, self.retry.attempts + 1):
            try:
                result = action()
            except PERMANENT_ERRORS:
                raise
            except Exception as error:  # the clients' transient errors (aiohttp, botocore) share no base class
                self._drop_file()
                if attempt == self.retry.attempts:
                    raise OSError(f"gave up after {attempt} tries at byte {self.position}: "
                                  f"{type(error).__name__}: {error}") from error
                wait = self.retry.wait_before(attempt + 1)
                log.warning("reading %s at byte %d: %s: %s; try %d of %d in %.1f s", self.url, self.position,
                            type(error).__name__, error, attempt + 1, self.retry.attempts, wait)
                time.sleep(wait)
                continue
            if attempt > 1:
                self.counts[RECOVERED_READ] += 1
            return result

    def _drop_file(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except Exception:  # closing a connection that already broke may fail too; it is gone either way
                pass
            self.file = None

    def close(self) -> None:
        self._drop_file()

    def __enter__(self) -> RemoteShard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_stats_file(directory: str) -> dict[str, int] | None:
    """Samples per shard file name from `directory`/_stats.json (local or remote); None when there is none."""
    protocol = protocol_of(directory)
    path = posixpath.join(directory, STATS_FILE) if protocol else os.path.join(directory, STATS_FILE)
    try:
        if protocol is None:
            with open(path) as handle:
                stats = json.load(handle)
        else:
            stats = json.loads(filesystem(protocol).cat_file(path))
        return {name: int(count) for name, count in stats["samples"].items()}
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"{path} is not a shard stats file ({{\"samples\": {{name: count}}}}): {error}") from error


def write_stats_file(directory: str, samples: dict[str, int]) -> str:
    """Merge `samples` (shard file name -> samples) into `directory`/_stats.json; returns its path."""
    protocol = protocol_of(directory)
    path = posixpath.join(directory, STATS_FILE) if protocol else os.path.join(directory, STATS_FILE)
    merged = {**(read_stats_file(directory) or {}), **samples}
    text = json.dumps({"samples": dict(sorted(merged.items()))}, indent=1) + "\n"
    if protocol is None:
        with open(path, "w") as handle:
            handle.write(text)
    else:
        filesystem(protocol).pipe_file(path, text.encode())
    return path
