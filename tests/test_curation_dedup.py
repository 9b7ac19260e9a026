"""`contrastive-data dedup` on the demo set with planted copies: byte-identical copies are all removed (and their
first occurrences kept), transformed copies of test images (re-encoded, resized, cropped, flipped) are removed
from training, and the same-class look-alikes that fill Fashion-MNIST are not taken for copies; with `--model`, the
encoder's embedding finds what brute-force cosine finds."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image, ImageOps

from contrastive.cli.data import main
from contrastive.curation.dedup import TRANSFORMS, transformed_copy
from contrastive.encoders import load_encoder
from tests.curation_helpers import read_members, tiny_checkpoint
from tests.data_factory import write_tar

PLANTED_PER_TRANSFORM = 8
EXACT_COPIES = 8


def samples_of(shard) -> list[tuple[str, dict[str, bytes]]]:
    members = read_members(shard)
    keys = sorted({name.split(".")[0] for name in members})
    return [(key, {ext: members[f"{key}.{ext}"] for ext in ("png", "txt")}) for key in keys]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_planted_copies_are_removed_and_look_alikes_kept(tmp_path, demo_root, capsys):
    originals = samples_of(demo_root / "train" / "0.tar") + samples_of(demo_root / "train" / "1.tar")
    test_images = samples_of(demo_root / "test" / "0.tar")
    rng = np.random.default_rng(3)
    planted = []
    for index, (key, files) in enumerate(test_images[:PLANTED_PER_TRANSFORM * len(TRANSFORMS)]):
        kind = TRANSFORMS[index % len(TRANSFORMS)]
        image = transformed_copy(Image.open(io.BytesIO(files["png"])).convert("RGB"), kind, rng)
        planted.append((f"planted_{kind}_{key}", {"png": png_bytes(image), "txt": b"a photo of a shirt."}))
    exact = [(f"exact_{key}", files) for key, files in originals[::16]]
    assert len(exact) == EXACT_COPIES
    write_tar(tmp_path / "0.tar", originals[:64] + planted[:16] + exact[:4])
    write_tar(tmp_path / "1.tar", originals[64:] + planted[16:] + exact[4:])

    out = tmp_path / "out"
    assert main(["dedup", str(tmp_path), "--eval-shards", str(demo_root / "test"), "--out", str(out),
                 "--calibration-samples", "128", "--no-progress"]) == 0
    print(capsys.readouterr().out)
    manifest = json.loads((out / "manifest.json").read_text())
    kept = {name.split(".")[0] for shard in out.glob("*.tar") for name in read_members(shard)}
    assert manifest["kept"] == len(kept)
    assert not kept & {key for key, _ in exact}
    assert {key for key, _ in originals[::16]} <= kept
    assert manifest["rules"][0]["dropped"] == EXACT_COPIES

    removed_planted = [key for key, _ in planted if key not in kept]
    recall = {kind: sum(key.startswith(f"planted_{kind}_") for key in removed_planted) / PLANTED_PER_TRANSFORM
              for kind in TRANSFORMS}
    # Measured: re-encoded 1.0, resized 0.375, cropped 0.875, flipped 1.0 (before crop views and the exactly
    # mirror-invariant thumbnail: 1.0, 0.625, 0.0, 0.875).
    assert recall["reencoded"] == recall["flipped"] == 1.0 and recall["cropped"] >= 0.75 and len(removed_planted) >= 24
    # Same-class look-alikes: calibration found none above either threshold among the training images' nearest
    # neighbours; against the 512 test images 3 of 128 (2.3%) were measured above the crop-view threshold (7 before).
    lookalikes_removed = [key for key, _ in originals if key not in kept]
    assert len(lookalikes_removed) <= 4
    calibration = manifest["dedup"]["calibration"]
    assert calibration["planted"] == 128 and calibration["false_positive_rate"] == 0.0
    assert manifest["dedup"]["eval_calibration"]["false_positive_rate"] == 0.0
    assert calibration["precision"] >= 0.99 and calibration["recall_by_transform"]["reencoded"] == 1.0


def test_model_embedding_drops_what_brute_force_cosine_over_the_encoder_finds(tmp_path, demo_root):
    """`dedup --model`: the encoder's image embedding of each image plus its mirror image, every pair compared
    here by brute force, must give the near duplicates the faiss index gave at the same --threshold."""
    model = tiny_checkpoint(tmp_path / "model")
    originals = samples_of(demo_root / "train" / "0.tar")[:9]
    mirrored = Image.open(io.BytesIO(originals[0][1]["png"])).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    samples = originals + [("mirrored", {"png": png_bytes(mirrored), "txt": b"a mirrored copy."}),
                           ("exact", originals[1][1])]
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "0.tar", samples)

    encoder = load_encoder(model)
    transform = encoder.preprocess.transform()
    with torch.no_grad():
        rows = []
        for _, files in samples:
            image = Image.open(io.BytesIO(files["png"])).convert("RGB")
            pair = torch.stack([transform(image), transform(ImageOps.mirror(image))])
            rows.append(encoder.model.encode_image(pair).double().sum(0))
    embeddings = torch.nn.functional.normalize(torch.stack(rows), dim=-1)
    similarity = (embeddings @ embeddings.T).numpy()
    exact = len(samples) - 1  # the byte-identical copy goes by its hash, not by the threshold
    pairs = sorted(similarity[i, j] for i in range(exact) for j in range(i + 1, exact))
    # A threshold in the widest gap among the upper third of the pairs: float32 rounding cannot move a pair across.
    upper = pairs[len(pairs) * 2 // 3:]
    gap = max(range(len(upper) - 1), key=lambda g: upper[g + 1] - upper[g])
    threshold = (upper[gap] + upper[gap + 1]) / 2
    expected = {samples[j][0] for j in range(exact) if any(similarity[i, j] >= threshold for i in range(j))}
    assert "mirrored" in expected  # the flip-summed embedding of a mirror image is the original's
    assert 1 < len(expected) < exact - 1  # measured: the mirror image and 4 of the 9 originals

    out = tmp_path / "out"
    assert main(["dedup", str(tmp_path / "shards"), "--model", str(model), "--threshold", repr(float(threshold)),
                 "--out", str(out), "--keep-list", "--no-progress"]) == 0
    kept = set((out / "keep.txt").read_text().split())
    assert {key for key, _ in samples} - kept == expected | {"exact"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == str(model) and len(manifest["model_sha256"]) == 64
