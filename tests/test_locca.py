"""LocCa (SigLIP 2's decoder objective): boxes through the crop, coordinates through the tokenizer, task sampling,
the prompt mask, the loss against a hand computation, the refusals, and parity under DDP and FSDP2."""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from contrastive.config import LossConfig
from contrastive.data.boxes import (
    CAPTION,
    GROUNDED_CAPTION,
    REFERRING,
    DecoderTasks,
    box_text,
    crop_boxes,
    parse_box_text,
    read_boxes,
    tokenize_decoder_texts,
)
from contrastive.data.transforms import BadSample, RandomCropFlip
from contrastive.dist import LocalCollectives
from contrastive.errors import ConfigError
from contrastive.losses import build_loss
from contrastive.models.locca import prompt_masked_targets
from contrastive.train.step import build_forward_backward
from contrastive.types import Batch, ModelOutput
from tests.conftest import compose_config, torchrun


def test_crop_moves_clips_and_drops_boxes_as_computed_by_hand():
    boxes = torch.tensor([[10., 10., 30., 30.],  # inside the crop
                          [0., 0., 8., 8.],  # left of and above it: nothing visible
                          [50., 40., 64., 64.],  # 2 x 8 of its 14 x 24 visible: dropped
                          [40., 10., 60., 20.]])  # 12 x 10 of its 20 x 10 visible (60%): kept, clipped
    # Crop rows 8..47 and columns 4..51 (top 8, left 4, height 40, width 48), resized to 24 x 24: x scales by 0.5,
    # y by 0.6.
    moved, kept = crop_boxes(boxes, (8, 4, 40, 48), size=24)
    assert kept.tolist() == [True, False, False, True]
    # (10 - 4) * 0.5 = 3, (10 - 8) * 0.6 = 1.2, (30 - 4) * 0.5 = 13, (30 - 8) * 0.6 = 13.2
    torch.testing.assert_close(moved[0], torch.tensor([3.0, 1.2, 13.0, 13.2]))
    # x1 clipped to the crop's width 48 -> 24; (40 - 4) * 0.5 = 18; y (10 - 8) * 0.6 = 1.2, (20 - 8) * 0.6 = 7.2
    torch.testing.assert_close(moved[3], torch.tensor([18.0, 1.2, 24.0, 7.2]))


def test_the_crop_region_is_where_the_pixels_came_from():
    """A white box on black: after a random crop its moved box outlines the white pixels of the output."""
    pixels = torch.zeros(80, 100, dtype=torch.uint8)
    pixels[30:60, 20:70] = 255  # the box [20, 30, 70, 60], half-open
    crop = RandomCropFlip(40, "nearest", (0.5, 1.0), horizontal_flip=False)
    for seed in range(5):
        image, region = crop.crop_with_region(Image.fromarray(pixels.numpy()).convert("RGB"),
                                              torch.Generator().manual_seed(seed))
        moved, kept = crop_boxes(torch.tensor([[20., 30., 70., 60.]]), region, size=40)
        white = image[0] > 127
        if not kept[0]:
            assert white.sum() < 0.5 * 50 * 30 * (40 / region[3]) * (40 / region[2])
            continue
        x0, y0, x1, y1 = moved[0].tolist()
        inner = white[math.ceil(y0) + 1:math.floor(y1) - 1, math.ceil(x0) + 1:math.floor(x1) - 1]
        assert inner.all(), (seed, region)
        outside = white.clone()
        outside[max(0, math.floor(y0) - 1):math.ceil(y1) + 1, max(0, math.floor(x0) - 1):math.ceil(x1) + 1] = False
        assert not outside.any(), (seed, region)


def test_read_boxes_parses_grit_style_json_and_counts_bad_ones():
    boxes, phrases = read_boxes(json.dumps({"boxes": [[1, 2, 3, 4]], "phrases": [" a dog "]}).encode())
    assert boxes.tolist() == [[1.0, 2.0, 3.0, 4.0]] and phrases == ["a dog"]
    assert read_boxes(b'{"caption": "no boxes"}')[0].shape == (0, 4)
    assert read_boxes(None)[1] == []
    for bad in ({"boxes": [[1, 2, 3]], "phrases": ["x"]}, {"boxes": [[3, 2, 1, 4]], "phrases": ["x"]},
                {"boxes": [[1, 2, 3, 4]], "phrases": []}, {"boxes": [[1, 2, 3, 4]], "phrases": [""]}):
        with pytest.raises(BadSample) as caught:
            read_boxes(json.dumps(bad).encode())
        assert caught.value.reason == "bad_boxes"


def test_box_text_round_trips_through_the_tokenizer_within_half_a_bin():
    tokenizer = open_clip.SimpleTokenizer(context_length=32)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        corner = torch.rand(2, generator=generator) * 48
        box = torch.cat([corner, corner + 1 + torch.rand(2, generator=generator) * 15])
        text = box_text(box, size=64, bins=100)
        assert len(text.split()) == 4 and all(len(word) == 2 for word in text.split())  # zero-padded
        ids = tokenizer([text])[0]
        decoded = tokenizer.decode(ids[(ids != 0) & (ids < 49406)].tolist())  # no start, end or padding tokens
        parsed = parse_box_text(decoded, size=64, bins=100)
        assert (parsed - box).abs().max() <= 64 / 99 / 2 + 1e-5, (text, decoded)
    assert parse_box_text("0 7 4", size=64, bins=100) is None
    assert parse_box_text("07 40 99 55", size=64, bins=100).tolist() == pytest.approx(
        [7 * 64 / 99, 40 * 64 / 99, 64.0, 55 * 64 / 99])


def test_tasks_follow_the_probabilities_repeat_by_seed_and_caption_without_boxes():
    tasks = DecoderTasks((0.5, 0.3, 0.2), bins=100, image_size=64)
    boxes, phrases = torch.tensor([[0., 0., 32., 32.], [32., 32., 64., 64.]]), ["bag", "coat"]
    draws = [tasks("a caption", boxes, phrases, torch.Generator().manual_seed(seed)) for seed in range(3000)]
    counts = [sum(1 for _, _, task in draws if task == index) for index in (CAPTION, REFERRING, GROUNDED_CAPTION)]
    for count, probability in zip(counts, (0.5, 0.3, 0.2)):
        assert abs(count - 3000 * probability) < 4 * math.sqrt(3000 * probability * (1 - probability)), counts
    again = [tasks("a caption", boxes, phrases, torch.Generator().manual_seed(seed)) for seed in range(3000)]
    assert again == draws
    for prompt, target, task in draws:
        if task == CAPTION:
            assert (prompt, target) == ("caption", "a caption")
        elif task == REFERRING:
            phrase = prompt.removeprefix("locate ")
            assert target == box_text(boxes[phrases.index(phrase)], 64, 100)
        else:
            location = prompt.removeprefix("describe ")
            assert location == box_text(boxes[phrases.index(target)], 64, 100)
    assert {tasks("c", torch.zeros(0, 4), [], torch.Generator().manual_seed(s))[2] for s in range(50)} == {CAPTION}
    with pytest.raises(ConfigError, match="sum to 1"):
        DecoderTasks((0.5, 0.5, 0.5), bins=100, image_size=64)


def test_decoder_tokens_score_only_the_target():
    tokenizer = open_clip.SimpleTokenizer(context_length=16)
    tokens, prompt_lengths = tokenize_decoder_texts(tokenizer, ["locate ankle boot", "caption"],
                                                    ["07 40 99 55", "a bag."])
    assert prompt_lengths.tolist() == [4, 2]  # start token + "locate ankle boot"; start token + "caption"
    inputs, targets = prompt_masked_targets(tokens, prompt_lengths)
    assert torch.equal(inputs, tokens[:, :-1])
    scored = [tokenizer.decode(row[row != -100].tolist()) for row in targets]
    assert scored[0].strip() == "0 7 4 0 9 9 5 5 <end_of_text>"
    assert scored[1].strip() == "a bag . <end_of_text>"
    # Hand example: position t predicts token t + 1; prompt [1, 5] and padding are not scored.
    inputs, targets = prompt_masked_targets(torch.tensor([[1, 5, 6, 7, 2, 0]]), torch.tensor([2]))
    assert targets.tolist() == [[-100, 6, 7, 2, -100]]


def test_loss_is_sigmoid_plus_per_example_decoder_mean_with_each_task_logged():
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    logits = torch.randn(4, 3, 11, generator=generator)
    targets = torch.tensor([[3, 4, -100], [-100, 5, 6], [7, -100, -100], [1, 2, 3]])
    output = ModelOutput(image_features=images, text_features=texts, logit_scale=torch.tensor(10.0),
                         logit_bias=torch.tensor(-5.0), caption_logits=logits, caption_targets=targets)
    batch = Batch(images=torch.empty(4, 0), tokens=torch.empty(4, 0, dtype=torch.long),
                  decoder_tasks=torch.tensor([0, 1, 1, 2]))
    cfg = LossConfig(name="siglip_locca")
    cfg.locca.decoder_weight = 0.5
    result = build_loss(cfg)(output, batch, LocalCollectives())
    # By hand: sigmoid over the 4 x 4 pairs (+1 on the diagonal), summed, over 4 rows.
    pair_logits = 10.0 * images @ texts.T - 5.0
    sigmoid = -sum(F.logsigmoid((1.0 if i == j else -1.0) * pair_logits[i, j]) for i in range(4) for j in range(4)) / 4
    per_example = []
    for row in range(4):
        scored = [(position, int(target)) for position, target in enumerate(targets[row]) if target != -100]
        per_example.append(sum(-F.log_softmax(logits[row, p], dim=-1)[t] for p, t in scored) / len(scored))
    decoder = sum(per_example) / 4
    torch.testing.assert_close(result.loss, sigmoid + 0.5 * decoder)
    torch.testing.assert_close(result.metrics["caption_loss"], per_example[0])
    torch.testing.assert_close(result.metrics["referring_loss"], (per_example[1] + per_example[2]) / 2)
    torch.testing.assert_close(result.metrics["grounded_caption_loss"], per_example[3])


def test_flips_and_views_are_refused_in_one_line_and_accumulation_is_not():
    """Accumulation's exactness: test_accumulation.py::test_feature_cache_matches_full_batch_for_siglip_locca."""
    from contrastive.config import validate
    from contrastive.losses import list_losses
    from contrastive.models import list_models
    from contrastive.train.step import FeatureCache

    for override, message in (("data.horizontal_flip=true", "horizontal_flip=false"),
                              ("data.local_views=2", "takes no data.global_views")):
        cfg = compose_config(["experiment=demo_siglip_locca", override])
        with pytest.raises(ConfigError, match=message):
            validate(cfg, 2, model_archs=list_models(), loss_names=list_losses())
    cfg = compose_config(["experiment=demo_siglip_locca", "trainer.accumulation_steps=4"])
    validate(cfg, 2, model_archs=list_models(), loss_names=list_losses())
    step = build_forward_backward(torch.nn.Linear(1, 1), build_loss(cfg.loss), LocalCollectives(),
                                  cfg.trainer.accumulation_steps, randomness=None)
    assert isinstance(step, FeatureCache)


@pytest.mark.distributed
def test_loss_and_every_gradient_under_ddp_and_fsdp_equal_one_process():
    result = torchrun(["tests/dist_scripts/locca_parity.py"], nproc=2)
    verdicts = [line for line in result.stdout.splitlines() if line.startswith("siglip_locca")]
    assert len(verdicts) == 2 and all(line.endswith("OK") for line in verdicts), result.stdout


def test_inspect_reports_box_statistics(tmp_path, capsys):
    import io

    import webdataset as wds

    from contrastive.cli.data import main

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (64, 32)).save(buffer, format="PNG")
        return buffer.getvalue()

    samples = [{"boxes": [[0, 0, 32, 16], [-2, 0, 14, 8]], "phrases": ["a", "b"]},  # areas 512 and 128 of 2048
               {"caption": "no boxes"},
               {"boxes": [[0, 0, 64, 32]], "phrases": ["c"]}]  # the whole image
    with wds.TarWriter(str(tmp_path / "0.tar")) as writer:
        for index, metadata in enumerate(samples):
            writer.write({"__key__": f"{index:03d}", "png": png(), "txt": "x", "json": json.dumps(metadata)})
    assert main(["inspect", str(tmp_path / "0.tar"), "--no-progress", "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "samples with boxes: 2 of 3; boxes per sample with boxes: min 1, median 1.5, max 2" in printed
    assert "box area / image area: min 0.0625, median 0.25, max 1; boxes past the image's edges: 1" in printed
    assert json.loads((tmp_path / "r.json").read_text())["boxes"] == 3


@pytest.mark.distributed
def test_demo_experiment_trains_on_two_ranks_logging_each_term(tmp_path):
    from contrastive.checkpoint_io import list_checkpoints, load_checkpoint
    from contrastive.data.grounding import build_grounding_dataset

    root = build_grounding_dataset(tmp_path / "grounding", train_canvases=64, test_canvases=8)
    run_dir = tmp_path / "run"
    torchrun(["-m", "contrastive.cli.train", "experiment=demo_siglip_locca", "debug=tiny",
              f"data.sources.0.shards={root / 'train'}", f"run_dir={run_dir}", "trainer.max_steps=2",
              "trainer.checkpoint_every=2", "data.batch_size=8", "trainer.threads_per_process=1"], nproc=2)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "loss" in row]
    assert len(logged) == 2
    for row in logged:
        terms = ("contrastive_loss", "decoder_loss", "caption_loss", "referring_loss", "grounded_caption_loss")
        assert all(math.isfinite(row[term]) for term in terms), row
    weights = load_checkpoint(list_checkpoints(run_dir)[-1][1])["model"]
    assert any(name.startswith("decoder.") for name in weights) and "clip.logit_bias" in weights


def test_a_resumed_stream_repeats_each_samples_task_and_targets(tmp_path):
    """demo_siglip_locca's stream (2 loader workers, batches of 8) stopped after 5 batches, mid-epoch, and resumed
    from the positions its batches carried: sample by sample, the same keys, decoder tasks, decoder texts (prompt and
    target tokens) and crops as the uninterrupted stream. With batches of 4, every sample gets the same task and
    texts: the draw is the sample's own, not its batch's (so neither a micro-batch split nor a resume moves it)."""
    from contrastive.data.grounding import build_grounding_dataset
    from contrastive.data.loader import build_train_loader
    from contrastive.encoders import preprocess_from_config
    from contrastive.models import build_tokenizer

    root = build_grounding_dataset(tmp_path / "grounding", train_canvases=96, test_canvases=4, canvas_size=32)
    cfg = compose_config(["experiment=demo_siglip_locca", f"data.sources.0.shards={root / 'train'}",
                          "data.num_workers=2", "data.shuffle_buffer=20"])
    tokenizer, preprocess = build_tokenizer(cfg.model), preprocess_from_config(cfg.model)

    def batches(count: int, batch_size: int = 8, start_step: int = 0, positions=None) -> list[Batch]:
        cfg.data.batch_size = batch_size
        loader = build_train_loader(cfg.data, preprocess, tokenizer, rank=0, world_size=1, seed=cfg.seed,
                                    start_step=start_step, positions=positions, locca=cfg.loss.locca)
        iterator = iter(loader)
        return [next(iterator) for _ in range(count)]

    def per_sample(stream: list[Batch]) -> list[tuple]:
        """(loader worker, key), task, decoder tokens, prompt length, crop; each worker reads the one shard on its
        own, so a key comes once per worker."""
        return [((batch.stream_position.worker, key), int(task), tokens.tolist(), int(prompt_length), image)
                for batch in stream
                for key, task, tokens, prompt_length, image in zip(
                    batch.keys, batch.decoder_tasks, batch.decoder_tokens, batch.decoder_prompt_lengths, batch.images)]

    straight = batches(16)  # 128 samples: past the 96-canvas epoch
    stop = 5
    positions = {batch.stream_position.worker: batch.stream_position for batch in straight[:stop]}
    resumed = per_sample(batches(16 - stop, start_step=stop, positions=positions))
    expected = per_sample(straight[stop:])
    assert [sample[:4] for sample in resumed] == [sample[:4] for sample in expected]
    assert all(torch.equal(ours[4], theirs[4]) for ours, theirs in zip(resumed, expected)), "crops differ"
    assert {sample[1] for sample in expected} == {CAPTION, REFERRING, GROUNDED_CAPTION}  # every task compared
    halves = {sample[0]: sample[1:4] for sample in per_sample(batches(16, batch_size=4))}
    whole = {sample[0]: sample[1:4] for sample in per_sample(straight[:8])}
    assert halves == whole  # the same 64 samples, 32 per worker

