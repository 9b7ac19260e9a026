"""Caption generation (greedy, beam search against exhaustive search), caption-likelihood scoring against a
direct computation, and zero-shot classification of a captioner through the shared evaluator."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from contrastive.cli.eval import main
from contrastive.config import ModelConfig
from contrastive.encoders import encoder_from_model
from contrastive.eval.captioning import (
    CaptionScoringClassifier,
    beam_search_captions,
    caption_log_likelihoods,
    caption_texts,
    greedy_captions,
    named_class,
)
from contrastive.eval.zeroshot import ZeroShotClassification
from contrastive.models import build_model, build_tokenizer

SOT, EOT, VOCAB = 4, 5, 6


class ToyCaptioner(torch.nn.Module):
    """Next-token logits from the current token, the position and the image: small enough to search exhaustively."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.token_table = torch.randn(VOCAB, VOCAB, generator=generator) * 2
        self.position_table = torch.randn(8, VOCAB, generator=generator)

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return images  # (B, 1, VOCAB)

    def decode(self, memory: torch.Tensor, inputs: torch.Tensor, parallel: bool = False) -> torch.Tensor:
        return self.token_table[inputs] + self.position_table[: inputs.shape[1]] + memory


def log_likelihood(model, image: torch.Tensor, sequence: list[int]) -> float:
    tokens = torch.tensor([sequence])
    log_probs = model.decode(image[None], tokens[:, :-1]).log_softmax(-1)
    return log_probs[0, torch.arange(len(sequence) - 1), tokens[0, 1:]].sum().item()


def exhaustive_best(model, image: torch.Tensor, max_length: int) -> list[int]:
    words = [t for t in range(VOCAB) if t not in (0, SOT, EOT)]
    candidates = []
    for length in range(0, max_length - 1):  # captions ending in EOT within max_length tokens
        candidates += [[SOT, *body, EOT] for body in itertools.product(words, repeat=length)]
    candidates += [[SOT, *body] for body in itertools.product([*words, EOT], repeat=max_length - 1)
                   if EOT not in body]  # cut off at max_length
    return max(candidates, key=lambda sequence: log_likelihood(model, image, sequence))


def unpadded(sequence: torch.Tensor) -> list[int]:
    return [t for t in sequence.tolist() if t != 0]


def test_beam_search_with_enough_beams_finds_the_most_likely_caption():
    model = ToyCaptioner()
    images = torch.randn(3, 1, VOCAB, generator=torch.Generator().manual_seed(1))
    found = beam_search_captions(model, images, SOT, EOT, max_length=5, beam_size=64)
    for image, sequence in zip(images, found):
        assert unpadded(sequence) == exhaustive_best(model, image, max_length=5)


def test_greedy_takes_the_most_likely_token_each_step_and_pads_after_the_end():
    model = ToyCaptioner()
    images = torch.randn(4, 1, VOCAB, generator=torch.Generator().manual_seed(2))
    found = greedy_captions(model, images, SOT, EOT, max_length=6)
    assert torch.equal(found, beam_search_captions(model, images, SOT, EOT, max_length=6, beam_size=1))
    for image, sequence in zip(images, found.tolist()):
        for step in range(1, len(sequence)):
            if sequence[step - 1] in (EOT, 0):
                assert sequence[step] == 0
                continue
            logits = model.decode(image[None], torch.tensor([sequence[:step]]))[0, -1]
            logits[[0, SOT]] = float("-inf")
            assert sequence[step] == logits.argmax().item()


def test_beam_search_never_scores_below_greedy_on_the_toy():
    model = ToyCaptioner()
    images = torch.randn(8, 1, VOCAB, generator=torch.Generator().manual_seed(3))
    greedy = greedy_captions(model, images, SOT, EOT, max_length=6)
    beam = beam_search_captions(model, images, SOT, EOT, max_length=6, beam_size=8)
    for image, g, b in zip(images, greedy, beam):
        assert log_likelihood(model, image, unpadded(b)) >= log_likelihood(model, image, unpadded(g)) - 1e-5


def tiny_cappa() -> torch.nn.Module:
    torch.manual_seed(0)
    vision = dict(image_size=28, patch_size=7, width=32, layers=1, head_width=16, mlp_ratio=2.0, pool_type="avg")
    text = dict(context_length=16, vocab_size=49408)
    decoder = dict(width=32, layers=1, heads=2, mlp_ratio=2.0)
    return build_model(ModelConfig(arch="cappa", embed_dim=32, vision=vision, text=text, decoder=decoder)).eval()


def toy_log_likelihood(model: ToyCaptioner, image: torch.Tensor, sequence: list[int]) -> float:
    """By hand from the toy's tables: logits at position t are token_table[x_t] + position_table[t] + image."""
    total = 0.0
    for t in range(len(sequence) - 1):
        logits = model.token_table[sequence[t]] + model.position_table[t] + image[0]
        total += (logits[sequence[t + 1]] - torch.logsumexp(logits, dim=0)).item()
    return total


def test_autoregressive_caption_scores_equal_a_hand_computed_sum_on_the_toy():
    model = ToyCaptioner()
    images = torch.randn(3, 1, VOCAB, generator=torch.Generator().manual_seed(4))
    captions = [[SOT, 1, 2, EOT], [SOT, 3, EOT], [SOT, 2, 2, 3, 1, EOT]]  # padded with zeros, which are not scored
    prompts = torch.zeros(len(captions), 7, dtype=torch.long)
    for row, caption in zip(prompts, captions):
        row[: len(caption)] = torch.tensor(caption)
    scores = caption_log_likelihoods(model, images, prompts, mode="autoregressive", chunk=4)
    assert scores.shape == (3, 3)
    for i, image in enumerate(images):
        for p, caption in enumerate(captions):
            assert scores[i, p].item() == pytest.approx(toy_log_likelihood(model, image, caption), rel=1e-5, abs=1e-5)


def test_autoregressive_caption_scores_equal_prefix_by_prefix_decoding():
    """Teacher forcing, one prefix at a time: the logits for token t+1 come from decoding prompt[:t+1] alone, so a
    decoder that peeks at later tokens (a broken causal mask) or a shifted target makes the scores differ."""
    model = tiny_cappa()
    tokenizer = build_tokenizer(model.cfg)
    images = torch.randn(2, 3, 28, 28)
    prompts = tokenizer(["a photo of a bag.", "a coat", "a picture of an ankle boot."])
    scores = caption_log_likelihoods(model, images, prompts, mode="autoregressive", chunk=2)
    with torch.no_grad():
        memory = model.encode_image_tokens(images)
        for i in range(2):
            for p in range(3):
                tokens = [t for t in prompts[p].tolist() if t != 0]
                expected = 0.0
                for t in range(1, len(tokens)):
                    logits = model.decode(memory[i : i + 1], torch.tensor([tokens[:t]]))[0, -1]
                    expected += (logits[tokens[t]] - torch.logsumexp(logits, dim=0)).item()
                assert scores[i, p].item() == pytest.approx(expected, rel=1e-4)


def test_parallel_caption_scores_equal_per_position_predictions_from_mask_tokens():
    """Parallel prediction reads mask tokens, not the prompt: decoding any token sequence of the training length
    in parallel mode gives the same per-position logits, and a prompt's score sums them at its own tokens."""
    model = tiny_cappa()
    tokenizer = build_tokenizer(model.cfg)
    images = torch.randn(2, 3, 28, 28)
    prompts = tokenizer(["a photo of a bag.", "a coat", "a picture of an ankle boot."])
    scores = caption_log_likelihoods(model, images, prompts, mode="parallel", chunk=1)
    length = prompts.shape[1] - 1
    with torch.no_grad():
        memory = model.encode_image_tokens(images)
        unrelated = torch.randint(1, 1000, (1, length), generator=torch.Generator().manual_seed(0))
        for i in range(2):
            log_probs = model.decode(memory[i : i + 1], unrelated, parallel=True)[0].log_softmax(-1)  # (T, V)
            for p in range(3):
                tokens = [t for t in prompts[p].tolist() if t != 0]
                expected = sum(log_probs[t - 1, tokens[t]].item() for t in range(1, len(tokens)))
                assert scores[i, p].item() == pytest.approx(expected, rel=1e-4)


def test_scoring_classifier_averages_templates_per_class():
    model = tiny_cappa()
    tokenizer = build_tokenizer(model.cfg)
    images = torch.randn(2, 3, 28, 28)
    classifier = CaptionScoringClassifier(model, tokenizer, ["bag", "coat"], ["a {c}.", "a photo of a {c}."],
                                          torch.device("cpu"))
    prompts = tokenizer(["a bag.", "a photo of a bag.", "a coat.", "a photo of a coat."])
    direct = caption_log_likelihoods(model, images, prompts).view(2, 2, 2).mean(dim=-1)
    torch.testing.assert_close(classifier(images), direct)


def test_caption_texts_strip_special_tokens():
    tokenizer = build_tokenizer(tiny_cappa().cfg)
    tokens = tokenizer(["a photo of a bag."])
    assert caption_texts(tokenizer, tokens) == ["a photo of a bag ."]


def test_shared_zero_shot_evaluator_scores_captions_for_a_model_without_text_tower(demo_root):
    model = tiny_cappa()
    evaluator = ZeroShotClassification("fm", demo_root, "test", batch_size=128)
    metrics = evaluator.run(encoder_from_model(model), torch.device("cpu"))
    assert set(metrics) == {"acc1", "acc5", "mean_per_class_recall"}
    assert 0 <= metrics["acc1"] <= metrics["acc5"] <= 1


def test_named_class_prefers_the_longest_class_name_in_the_caption():
    names = ["T-shirt/top", "trouser", "shirt", "ankle boot"]
    assert named_class("a photo of a t - shirt / top .", names) == 0
    assert named_class("a picture of the shirt .", names) == 2
    assert named_class("a blurry ankle boot", names) == 3
    assert named_class("a photo of a hat", names) is None


@pytest.mark.slow
def test_caption_cli_on_a_trained_checkpoint(demo_root, tmp_path):
    from tests.conftest import tiny_run_overrides
    from tests.test_training import _train_one_process

    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_run_overrides(demo_root, run_dir) if not o.startswith("model=")]
    result = _train_one_process([*overrides, "model=tiny_cappa", "loss=cappa", "trainer.max_steps=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "captions.jsonl"
    assert main(["caption", "--checkpoint", str(run_dir), "--dataset-root", str(demo_root), "--count", "5",
                 "--beam-size", "2", "--max-length", "6", "--output", str(output), "--threads", "1"]) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 5 and all(set(r) == {"key", "label", "caption", "named_class"} for r in records)
