"""The wandb logger, offline: a training run writes a wandb run whose history, read back from its `.wandb` file,
holds the same metrics per step as metrics.jsonl. No network and no account.

The `.wandb` file is read here with its own small reader (the LevelDB log layout wandb uses: a 7-byte file header,
32 KiB blocks of CRC-checked chunks, each record a `wandb_internal_pb2.Record`), not with the code that wrote it.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2

from contrastive.config import LoggerConfig, WandbConfig
from contrastive.errors import ConfigError
from contrastive.train.metrics import MetricsLogger, wandb_run_id
from tests.conftest import process_env, run, tiny_run_overrides

BLOCK, CHUNK_HEADER = 32768, 7  # bytes
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4  # chunk types


def read_wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), "not a version-0 wandb log"
    records, pending, position = [], b"", 7
    while position + CHUNK_HEADER <= len(data):
        if BLOCK - position % BLOCK < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            position += BLOCK - position % BLOCK
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + CHUNK_HEADER])
        if kind == 0 and length == 0:  # zeros: the writer stopped here
            break
        chunk = data[position + CHUNK_HEADER:position + CHUNK_HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"corrupt chunk at byte {position}"
        position += CHUNK_HEADER + length
        pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_offline_wandb_run_holds_the_logged_metrics(demo_root, tmp_path):
    run_dir = tmp_path / "run"
    env = {key: value for key, value in process_env().items() if not key.startswith("WANDB_")}
    home = tmp_path / "wandb_home"  # nothing lands in the repository or the home directory
    env.update({f"WANDB_{name}_DIR": str(home / name.lower()) for name in ("CONFIG", "CACHE", "DATA")},
               WANDB_DIR=str(home))
    result = run([sys.executable, "-m", "contrastive.cli.train", *tiny_run_overrides(demo_root, run_dir),
                  "logger.wandb.mode=offline", "logger.wandb.project=test-project"], timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    [wandb_file] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(wandb_file)
    [run_record] = [record.run for record in records if record.HasField("run")]
    assert run_record.project == "test-project"
    assert run_record.run_id == (run_dir / "wandb_run_id.txt").read_text().strip()
    assert records[-1].HasField("exit") and records[-1].exit.exit_code == 0, "the run was finished"

    # wandb-core writes a flat key as a nested key of one part
    history = {record.history.step.num: {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                         for item in record.history.item}
               for record in records if record.HasField("history")}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history) == [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        logged = {key: value for key, value in row.items() if key != "step"}
        assert {key: history[row["step"]][key] for key in logged} == logged, row["step"]
    assert len({row["loss"] for row in rows}) == 4, "distinct losses: a shifted step would be caught"


def test_runs_sharing_a_name_get_their_own_wandb_ids_and_a_resumed_run_keeps_its_own(tmp_path):
    first, second = wandb_run_id(tmp_path / "a", "demo"), wandb_run_id(tmp_path / "b", "demo")
    assert first != second and first.startswith("demo-") and second.startswith("demo-")
    assert wandb_run_id(tmp_path / "a", "demo") == first, "resuming in the same directory continues the same run"


def test_online_wandb_that_cannot_start_stops_the_run_before_training(tmp_path, monkeypatch):
    import wandb

    def unreachable(**kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", unreachable)
    cfg = LoggerConfig(wandb=WandbConfig(mode="online"))
    with pytest.raises(ConfigError, match="logger=online: wandb could not start .*unreachable.*logger=offline"):
        MetricsLogger(cfg, tmp_path, "demo", {}, enabled=True, total_steps=1, start_step=0, progress_bar=False)
    offline = LoggerConfig(wandb=WandbConfig(mode="offline"))  # offline: warned, metrics.jsonl goes on
    logger = MetricsLogger(offline, tmp_path, "demo", {}, enabled=True, total_steps=1, start_step=0,
                           progress_bar=False)
    assert logger.wandb_run is None
    logger.close()
