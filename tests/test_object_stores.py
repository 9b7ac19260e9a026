"""Shards in object stores, read from servers the tests start on 127.0.0.1: moto's S3 server, and an HTTP file
server that cuts responses short (plain http:// on loopback stands in for https://: both go through fsspec's
aiohttp client, TLS aside)."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from contrastive.checkpoint_io import list_checkpoints, load_checkpoint
from contrastive.cli.data import main as data_main
from contrastive.data import plan, remote
from contrastive.data.loader import build_sources
from contrastive.data.plan import count_shard_samples
from contrastive.data.reader import iter_shard
from contrastive.data.remote import RetryPolicy
from contrastive.errors import InputError
from tests.conftest import compose_config, run, tiny_run_overrides, torchrun
from tests.data_factory import bad_shard_set, good_samples, write_tar
from tests.object_stores import faulty_file_server, gcs_emulator, gcs_upload, s3_environment, s3_server, upload

TRAIN = ["-m", "contrastive.cli.train"]
NO_WAIT = RetryPolicy(attempts=3, first_wait_s=0.0)


@pytest.fixture(autouse=True)
def fresh_clients(monkeypatch):
    """Every test makes its own clients, from the environment it sets."""
    monkeypatch.setattr(remote, "_clients", {})


@pytest.fixture(scope="module")
def s3_endpoint():
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    for name, value in s3_environment(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    return s3_endpoint


def tar_keys(path: Path) -> list[str]:
    """Sample keys in order, read with tarfile from the local file (independent of the reader under test)."""
    with tarfile.open(path) as archive:
        return list(dict.fromkeys(member.name.split(".")[0] for member in archive))


def shard_dir(root: Path, shards: int, per_shard: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for index in range(shards):
        write_tar(root / f"{index}.tar", good_samples(f"s{index}-", per_shard))
    return root


def test_cut_read_is_retried_and_recovered_and_a_shard_that_keeps_failing_is_lost_once(tmp_path, monkeypatch):
    root = shard_dir(tmp_path / "shards", shards=3, per_shard=24)
    monkeypatch.setattr(remote, "READ_BLOCK_BYTES", 4096)  # many ranged reads per shard, so a cut lands mid-object
    with faulty_file_server(root) as server:
        server.cut_gets["1.tar"] = {3}  # the third ranged read of shard 1 stops halfway through its body
        server.broken.add("2.tar")  # every read of shard 2 stops halfway
        counts: Counter = Counter()
        keys = [raw["__key__"] for index in range(3)
                for raw in iter_shard(f"{server.url}/{index}.tar", counts, NO_WAIT)]
        gets = dict(server.gets)
    assert keys == tar_keys(root / "0.tar") + tar_keys(root / "1.tar")  # shard 1 whole, in order, despite the cut
    assert counts == {"recovered_read": 1, "unreadable_shard": 1}
    assert gets["1.tar"] > 3 and gets["2.tar"] == NO_WAIT.attempts


def test_too_many_lost_shards_stop_the_training_run_naming_them(tmp_path):
    root = shard_dir(tmp_path / "shards", shards=4, per_shard=16)
    with faulty_file_server(root) as server:
        server.broken |= {"1.tar", "3.tar"}
        overrides = [*tiny_run_overrides(tmp_path, tmp_path / "run"),
                     f"data.sources.0.shards='{server.url}/{{0..3}}.tar'", "data.resampled=false",
                     "data.max_skip_fraction=0.25", "data.read_attempts=2", "data.retry_wait_s=0",
                     "data.num_workers=1"]  # the error is raised in a data-loader worker
        result = run([sys.executable, *TRAIN, *overrides], timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("contrastive-train: error: data source")
    assert "more than data.max_skip_fraction=0.25" in error
    assert f"{server.url}/1.tar" in error and f"{server.url}/3.tar" in error and "0.tar" not in error
    assert error.endswith("(DataLoader worker process 0)") and "Traceback" not in result.stderr


def test_recovered_reads_and_lost_shards_are_counted_apart_in_training_metrics(tmp_path):
    root = shard_dir(tmp_path / "shards", shards=4, per_shard=16)
    with faulty_file_server(root) as server:
        server.cut_gets["1.tar"] = {1}
        server.broken.add("3.tar")
        run_dir = tmp_path / "run"
        overrides = [*tiny_run_overrides(tmp_path, run_dir), f"data.sources.0.shards='{server.url}/{{0..3}}.tar'",
                     "data.resampled=false", "data.max_skip_fraction=0.25", "data.read_attempts=2",
                     "data.retry_wait_s=0"]
        result = run([sys.executable, *TRAIN, *overrides], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    last = _metrics(run_dir)[-1]
    # 4 steps of 16 from 48 readable samples per epoch: the 64-sample shuffle buffer reads both epochs whole.
    assert last["step"] == 4
    assert last["data_recovered_reads"] == 1  # shard 1's first read only
    assert last["data_lost_shards"] == last["data_skipped/unreadable_shard"] == 2  # shard 3, once per epoch
    assert last["data_skipped_samples"] == 2  # no sample was bad; the lost shards are its only entries


def test_http_shards_validate_and_a_stats_file_spares_the_plan_any_shard_read(tmp_path, capsys):
    root = shard_dir(tmp_path / "shards", shards=2, per_shard=16)
    with faulty_file_server(root) as server:
        assert data_main(["validate", f"{server.url}/{{0..1}}.tar", "--no-progress"]) == 0
        assert "samples: 32 (32 good)" in capsys.readouterr().out
        header_count = count_shard_samples(f"{server.url}/0.tar")  # no stats file: the tar headers, by ranges
        (root / "_stats.json").write_text(json.dumps({"samples": {"0.tar": 16, "1.tar": 16}}))
        server.gets.clear()
        stats_counts = [count_shard_samples(f"{server.url}/{index}.tar", {}) for index in range(2)]
        gets = dict(server.gets)
    assert header_count == len(tar_keys(root / "0.tar")) == 16
    assert stats_counts == [16, 16] and gets == {"_stats.json": 2}  # no byte of a shard was read


def test_counting_a_remote_shard_without_stats_stops_at_the_read_limit(tmp_path, monkeypatch):
    root = shard_dir(tmp_path / "shards", shards=1, per_shard=64)
    monkeypatch.setattr(plan, "PLAN_BLOCK_BYTES", 4096)
    monkeypatch.setattr(plan, "PLAN_READ_LIMIT_BYTES", 16384)  # a quarter of the shard
    with faulty_file_server(root) as server, pytest.raises(InputError, match="--write-stats"):
        plan.count_shard_samples(f"{server.url}/0.tar")
    assert (root / "0.tar").stat().st_size > 4 * 16384


def test_without_the_s3_extra_a_remote_shard_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if not installed: importing it raises ImportError
    # fsspec's record of the class it imported (the module fsspec.registry, not the mapping fsspec exports as registry)
    monkeypatch.delitem(importlib.import_module("fsspec.registry")._registry, "s3", raising=False)
    assert data_main(["validate", "s3://bucket/shards/"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "s3:// shards need the object-store clients: pip install 'contrastive[s3]'" in error[0]


def test_inspect_and_validate_an_s3_prefix_and_write_its_stats(s3_env, tmp_path, capsys):
    shards, per_pass, good = bad_shard_set(tmp_path / "bad")
    present = [Path(path) for path in shards[:3]]  # the fourth is the missing one
    upload(s3_env, "inspect", {f"bad/{path.name}": path.read_bytes() for path in present})
    assert data_main(["inspect", "s3://inspect/bad/", "--no-progress", "--json", str(tmp_path / "report.json"),
                      "--write-stats"]) == 0
    assert "wrote s3://inspect/bad/_stats.json (2 shards)" in capsys.readouterr().out  # the truncated one is not
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["shards"] == 3 and report["good"] == good
    assert report["bad"] == {reason: count for reason, count in per_pass.items() if reason != "unreadable_shard"}
    stats = json.loads(downloaded(s3_env, "inspect", "bad/_stats.json"))
    assert stats == {"samples": {path.name: len(tar_keys(path)) for path in present[:2]}}
    assert data_main(["validate", "s3://inspect/bad/{0..2}.tar", "--no-progress"]) == 1
    assert data_main(["validate", "s3://inspect/bad/1.tar", "--no-progress"]) == 0


def downloaded(endpoint: str, bucket: str, key: str) -> bytes:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_missing_bucket_prefix_and_credentials_are_one_line_before_compute(s3_env, tmp_path, monkeypatch, capsys):
    upload(s3_env, "present", {"shards/0.tar": write_tar(tmp_path / "0.tar", good_samples("a", 2)).read_bytes()})
    assert data_main(["validate", "s3://no-such-bucket/shards/"]) == 2
    assert "'s3://no-such-bucket/shards/': bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    assert data_main(["validate", "s3://present/elsewhere/"]) == 2
    assert "'s3://present/elsewhere/' holds no .tar shards" in capsys.readouterr().err
    assert data_main(["validate", "s3://no-such-bucket/shards/{0..3}.tar"]) == 2
    assert "s3://no-such-bucket/shards/0.tar cannot be read: FileNotFoundError" in capsys.readouterr().err
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no wait for an instance-metadata endpoint
    monkeypatch.setattr(remote, "_clients", {})
    with pytest.raises(InputError, match="s3://present/shards/0.tar cannot be read: NoCredentialsError"):
        remote.check_remote_shards_readable(["s3://present/shards/0.tar"], "web")

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr(remote, "_clients", {})
    data = compose_config([*tiny_run_overrides(tmp_path, tmp_path / "run"),
                           "data.sources.0.shards='s3://no-such-bucket/laion/{0..9}.tar'"]).data
    with pytest.raises(InputError) as raised:  # what training builds its sources with, before its first step
        build_sources(data)
    assert str(raised.value) == ("data source 'fashion-mnist': s3://no-such-bucket/laion/0.tar cannot be read: "
                                 "FileNotFoundError: The specified bucket does not exist")


def test_gs_prefix_lists_reads_and_takes_stats_on_a_gcs_emulator(tmp_path, monkeypatch, capsys):
    root = shard_dir(tmp_path / "shards", shards=3, per_shard=8)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # gcsfs's gRPC bucket probe: no emulator has it
    with gcs_emulator() as emulator:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)  # gcsfs's own switch to an emulator
        gcs_upload(emulator, "gbucket", {f"web/{path.name}": path.read_bytes() for path in sorted(root.glob("*.tar"))})
        assert data_main(["inspect", "gs://gbucket/web/", "--no-progress", "--write-stats"]) == 0
        output = capsys.readouterr().out
        listed = count_shard_samples("gs://gbucket/web/2.tar")
    assert "samples: 24 (24 good)" in output and "wrote gs://gbucket/web/_stats.json (3 shards)" in output
    assert listed == len(tar_keys(root / "2.tar")) == 8


@pytest.mark.distributed
def test_two_rank_training_from_an_s3_prefix_resumes_exactly(s3_env, demo_root, tmp_path):
    """2 ranks, each with a data worker process, read a finite run from s3:// (sized by the prefix's _stats.json;
    the s3_env fixture put the endpoint and keys in os.environ, which torchrun's processes get). Resumed from its
    step-3 checkpoint in a copy of its run directory (what a crash right after that checkpoint leaves), the run
    ends with the weights and data positions of the uninterrupted one."""
    train = sorted((demo_root / "train").glob("*.tar"))
    upload(s3_env, "demo", {f"train/{path.name}": path.read_bytes() for path in train})
    assert data_main(["inspect", "s3://demo/train/", "--no-progress", "--write-stats"]) == 0
    common = ["data.sources.0.shards='s3://demo/train/'", "data.sources.0.max_samples=96", "data.num_workers=1",
              "trainer.max_steps=100", "trainer.checkpoint_every=3", "trainer.deterministic=true"]

    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    torchrun([*TRAIN, *tiny_run_overrides(demo_root, straight_dir), *common], nproc=2)
    # 96 samples over 2 ranks x 1 worker: 48 per worker, 6 local batches of 8 each, so 6 steps.
    assert [row["step"] for row in _metrics(straight_dir)] == list(range(1, 7))
    assert [step for step, _ in list_checkpoints(straight_dir)] == [3, 6]

    shutil.copytree(straight_dir, resumed_dir)
    list_checkpoints(resumed_dir)[-1][1].unlink()
    metrics_file = resumed_dir / "metrics.jsonl"
    metrics_file.write_text("".join(line + "\n" for line in metrics_file.read_text().splitlines()
                                    if json.loads(line)["step"] <= 3))
    torchrun([*TRAIN, *tiny_run_overrides(demo_root, resumed_dir), *common, "resume=latest"], nproc=2)

    assert [row["step"] for row in _metrics(resumed_dir)] == list(range(1, 7))
    straight_state = load_checkpoint(list_checkpoints(straight_dir)[-1][1])
    resumed_state = load_checkpoint(list_checkpoints(resumed_dir)[-1][1])
    assert resumed_state["step"] == straight_state["step"] == 6
    for name, tensor in straight_state["model"].items():
        torch.testing.assert_close(resumed_state["model"][name], tensor, rtol=0, atol=0, msg=name)
    assert resumed_state["data_positions"] == straight_state["data_positions"]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

