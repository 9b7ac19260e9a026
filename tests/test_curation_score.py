"""`contrastive-data score`: under torchrun (2 ranks), killed mid-run and started again, it rescores no finished
shard and writes the rows a one-process run writes; its similarities are the encoder's own, computed here."""

from __future__ import annotations

import io
import time

import open_clip
import py3langid
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from contrastive.curation.scoring import ScoreOptions, score_shards
from contrastive.encoders import load_encoder
from tests.conftest import run, running, torchrun_command
from tests.curation_helpers import read_members, tiny_checkpoint

pytestmark = pytest.mark.distributed

SCORE = ["-m", "contrastive.cli.data", "score"]


def sorted_rows(path):
    return sorted(pq.read_table(path).to_pylist(), key=lambda row: (row["shard"], row["key"]))


def test_kill_and_resume_under_torchrun_gives_the_one_process_rows(tmp_path, demo_root):
    model = tiny_checkpoint(tmp_path / "model")
    shards = [str(demo_root / "train" / f"{index}.tar") for index in range(3)]
    gate = tmp_path / "gate"
    # The fourth shard (rank 1's second) waits for the gate: the run is killed while it waits, with every other
    # shard scored.
    shards.append(f"pipe:while [ ! -e {gate} ]; do sleep 0.1; done; cat {demo_root / 'train' / '3.tar'}")
    pattern = "::".join(shards)
    out = tmp_path / "scores.parquet"
    parts = tmp_path / "scores.parquet.parts"
    command = torchrun_command([*SCORE, pattern, "--model", str(model), "--out", str(out), "--embeddings",
                                "--batch-size", "16", "--no-progress"])
    with running(command) as process:
        deadline = time.monotonic() + 240
        while len(list(parts.glob("*.parquet"))) < 3:
            assert process.poll() is None, "the scoring run ended before it was killed"
            assert time.monotonic() < deadline, "three shards were not scored in time"
            time.sleep(0.2)
    assert not out.exists()
    finished = {path.name: path.stat().st_mtime_ns for path in parts.glob("*.parquet")}

    gate.touch()
    resumed = run(command, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "scored 0 shards, 2 already done" in resumed.stdout  # rank 0: both of its shards were done
    assert "scored 1 shards, 1 already done" in resumed.stdout
    assert {path.name: path.stat().st_mtime_ns for path in parts.glob("*.parquet") if path.name in finished} \
        == finished

    # The uninterrupted one-process run, in this process with the scorers' one thread.
    reference = tmp_path / "one_process.parquet"
    encoder = load_encoder(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        score_shards(shards, encoder, reference, rank=0, world_size=1, barrier=lambda: None,
                     device=torch.device("cpu"), options=ScoreOptions(16, with_embeddings=True), progress=False)
    finally:
        torch.set_num_threads(threads)
    rows = sorted_rows(out)
    assert len(rows) == 4 * 64
    assert rows == sorted_rows(reference)

    # The first shard's rows, computed here from the tar members with the encoder itself.
    members = read_members(demo_root / "train" / "0.tar")
    keys = sorted({name.split(".")[0] for name in members})
    captions = [members[f"{key}.txt"].decode() for key in keys]
    transform = encoder.preprocess.transform()
    images = torch.stack([transform(Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGB")) for key in keys])
    with torch.no_grad():
        image_features = encoder.model.encode_image(images)
        similarity = (image_features * encoder.model.encode_text(encoder.tokenizer(captions))).sum(dim=1)
    first = [row for row in rows if row["shard"] == shards[0]]
    assert [row["key"] for row in first] == keys
    assert [row["similarity"] for row in first] == pytest.approx(similarity.tolist(), abs=1e-5)
    assert [row["image_embedding"] for row in first[:2]] == [pytest.approx(f, abs=1e-5) for f in
                                                             image_features[:2].tolist()]
    bpe = open_clip.SimpleTokenizer()  # start and end tokens added, cut at test_tiny's context of 16
    assert [row["caption_tokens"] for row in first] == [min(len(bpe.encode(c)) + 2, 16) for c in captions]
    assert [row["language"] for row in first] == [py3langid.classify(caption)[0] for caption in captions]
