"""Writing kept samples back as img2dataset shards: every member of a sample kept, in its order, and the shards
evened out (sizes differ by at most one sample), so a finite training run's ranks see equal shares."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from contrastive.data.reader import RawSample

_MTIME = 0  # fixed member times: the same input and selection give byte-identical shards


def even_sizes(total: int, samples_per_shard: int) -> list[int]:
    """`total` samples in ceil(total / samples_per_shard) shards whose sizes differ by at most one."""
    count = -(-total // samples_per_shard)
    return [total // count + (1 if index < total % count else 0) for index in range(count)] if total else []


class EvenShardWriter:
    """Writes samples into `directory`/000000.tar, 000001.tar, ... of the sizes `even_sizes` gives."""

    def __init__(self, directory: Path, total: int, samples_per_shard: int) -> None:
        self.directory = directory
        self.sizes = even_sizes(total, samples_per_shard)
        self.written: dict[str, int] = {}
        self._archive: tarfile.TarFile | None = None
        self._index = -1
        self._in_current = 0

    def _next_archive(self) -> None:
        self.close()
        self._index += 1
        name = f"{self._index:06d}.tar"
        self._archive = tarfile.open(self.directory / name, "w", format=tarfile.USTAR_FORMAT)
        self.written[name] = 0
        self._in_current = 0

    def write(self, sample: RawSample) -> None:
        if self._archive is None or self._in_current == self.sizes[self._index]:
            self._next_archive()
        key = sample["__key__"]
        for extension, data in sample.items():
            if extension.startswith("__"):
                continue
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
            self._archive.addfile(info, io.BytesIO(data))
        self._in_current += 1
        self.written[f"{self._index:06d}.tar"] = self._in_current

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()
            self._archive = None
