"""contrastive-eval grounding: the probe and the decoder's referring accuracy against encoders whose answers are
known (a perfect and a blind one; an oracle decoder and a wrong one)."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from torch import nn

from contrastive.data import demo
from contrastive.data.boxes import box_text
from contrastive.data.grounding import build_grounding_dataset, load_grounding_split
from contrastive.data.transforms import Preprocess
from contrastive.encoders.encoder import LoadedEncoder
from contrastive.eval.grounding import ProbeSettings, decoder_referring_accuracy, probe_accuracy


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = build_grounding_dataset(tmp_path_factory.mktemp("g") / "set", source=demo.DIGITS_SOURCE, seed=1,
                                   train_canvases=300, test_canvases=20, canvas_size=32)
    return load_grounding_split(root, "train"), load_grounding_split(root, "test")


def box_tokens(split) -> torch.Tensor:
    """A perfect encoder: token k, channel c holds coordinate k / 32 of class c's box (0 where absent): (B, 4, 10)."""
    tokens = np.zeros((len(split.images), 4, 10), dtype=np.float32)
    for index, (boxes, labels) in enumerate(zip(split.boxes, split.labels)):
        tokens[index, :, labels] = boxes / 32
    return torch.from_numpy(tokens)


@pytest.fixture
def one_thread():
    """The probe's matrices are tiny: on a shared 2-core machine a second thread only waits (7x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_probe_finds_boxes_in_informative_tokens_and_not_in_noise(splits, one_thread):
    train, test = splits
    settings = ProbeSettings(steps=600, batch_size=128, width=64)
    informed = probe_accuracy(box_tokens(train), train, box_tokens(test), test, settings)
    noise = torch.Generator().manual_seed(0)
    blind = probe_accuracy(torch.randn(len(train.images), 4, 10, generator=noise), train,
                           torch.randn(len(test.images), 4, 10, generator=noise), test, settings)
    assert informed["probe_acc_iou50"] >= 0.6, informed
    assert blind["probe_acc_iou50"] <= 0.3 and blind["probe_mean_iou"] < informed["probe_mean_iou"], blind


class OracleDecoder(nn.Module):
    """Reads the canvas index (images arrive in order) and the phrase from the prompt, and writes the true box's
    digits; with `shift`, a box moved by half the canvas."""

    context_length = 32

    def __init__(self, split, tokenizer, bins: int, shift: float = 0.0) -> None:
        super().__init__()
        self.split, self.tokenizer, self.bins, self.shift, self.seen = split, tokenizer, bins, shift, 0

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        indices = torch.arange(self.seen, self.seen + len(images), dtype=torch.float32)
        self.seen += len(images)
        return indices[:, None, None]

    def decode(self, memory: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(sequence), sequence.shape[1], 49408)
        for row, tokens in enumerate(sequence):
            words = self.tokenizer.decode(tokens[1:].tolist()).split()
            phrase = " ".join(word for word in words[1:] if not word.isdigit() and word != "<end_of_text>")
            canvas = int(memory[row, 0, 0])
            box = torch.as_tensor(self.split.boxes[canvas][self.split.phrases[canvas].index(phrase)]).float()
            answer = box_text(box + self.shift * 32, 32, self.bins).replace(" ", "")
            written = sum(word.isdigit() for word in words)
            digit = answer[written] if written < len(answer) else "0"
            logits[row, -1, self.tokenizer.encode(digit)[0]] = 1.0
        return logits


@pytest.mark.parametrize(("shift", "expected"), [(0.0, 1.0), (0.5, 0.0)])
def test_decoder_referring_accuracy_counts_boxes_the_decoder_writes(splits, shift, expected):
    _, test = splits
    tokenizer = open_clip.SimpleTokenizer(context_length=32)
    encoder = LoadedEncoder(model=OracleDecoder(test, tokenizer, 100, shift),
                            preprocess=Preprocess(32, [0.5] * 3, [0.5] * 3, "bilinear"), tokenizer=tokenizer,
                            kind="contrastive", name="oracle", source="-")
    assert decoder_referring_accuracy(encoder, test, torch.device("cpu"), bins=100, batch_size=4) == expected
