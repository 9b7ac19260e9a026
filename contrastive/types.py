"""The types that cross module lines: what the data pipeline yields (and where its stream stands), what models
return, what losses return, the collectives losses talk to other ranks through, and the evaluators a training run
is handed."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import numpy as np
import torch

# A batch's tensors of up to this many bytes cross from a DataLoader worker to the main process inside the pickle,
# by value. torch hands a tensor over as a shared-memory handle: a file descriptor the main process fetches over a
# socket from a server thread in the worker, which must first get the worker's GIL, held by the decoding loop for up
# to its 5 ms switch interval. Receiving a ready batch of benchmarks/reinforced_step_time.py's took 16 ms with four
# handles (tokens, labels, teachers' targets, images), 12 ms with scratch's three; 8 ms for both by value (and the
# image buffer by reference, contrastive.data.batch_memory.RingImages).
BY_VALUE_BYTES = 1 << 20


def _by_value(value: Any) -> Any:
    """A small CPU tensor as a numpy array, which pickles by value; anything else as it is."""
    if (isinstance(value, torch.Tensor) and value.device.type == "cpu" and not value.requires_grad
            and value.dtype != torch.bfloat16 and value.numel() * value.element_size() <= BY_VALUE_BYTES):
        return value.numpy()
    return value


def _from_by_value(value: Any) -> Any:
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _rebuild(cls: type, state: dict[str, Any]) -> Any:
    return cls(**{name: _from_by_value(value) for name, value in state.items()})


def _reduce_by_value(instance: Any) -> tuple:
    """A dataclass's pickling with its small tensors by value (BY_VALUE_BYTES); its fields hold no numpy arrays."""
    return _rebuild, (type(instance), {f.name: _by_value(getattr(instance, f.name)) for f in fields(instance)})


@dataclass(frozen=True)
class StreamPosition:
    """Where one logical data worker's stream stands after a batch: what restarts it exactly there.

    The data pipeline writes it into every batch and resumes from it; the trainer checkpoints it as plain data
    (`to_dict`, `from_dict`), so checkpoint files stay loadable with torch.load(weights_only=True).
    """

    worker: int  # the logical worker (contrastive.data.stream), not the DataLoader worker that ran it
    sources: dict[str, tuple[int, int, int]]  # source name -> (epoch, raw samples consumed in it, taken in the run)
    exhausted: tuple[str, ...]  # sources that met their cap, sorted
    past_plan: bool  # reading on beyond a finite run's caps (always so for an endless stream)
    past_plan_samples: int  # raw samples read past the plan
    mixer_draws: int  # draws of the source mixer's RNG so far
    skipped: dict[str, int]  # bad samples and lost shards by reason, and remote reads a retry fixed (recovered_read)
    samples_seen: int  # good samples decoded
    # Length bucketing (data.length_bucketing): batches of the current window already yielded; the fields above
    # then hold the window's start, where a resume reads the window again.
    bucket_batches_taken: int = 0

    def to_dict(self) -> dict[str, Any]:
        saved = {
            "worker": self.worker,
            "sources": {name: list(position) for name, position in self.sources.items()},
            "exhausted": list(self.exhausted),
            "past_plan": self.past_plan,
            "past_plan_samples": self.past_plan_samples,
            "mixer_draws": self.mixer_draws,
            "skipped": dict(self.skipped),
            "samples_seen": self.samples_seen,
        }
        if self.bucket_batches_taken:  # only inside a length-bucketing window; other positions keep the old layout
            saved["bucket_batches_taken"] = self.bucket_batches_taken
        return saved

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> StreamPosition:
        # Checkpoints from before source caps lack exhausted/past_plan(_samples) and keep (epoch, consumed) per
        # source: their streams were endless, which is past any plan, and had taken nothing against a cap.
        return cls(
            worker=saved["worker"],
            sources={name: (*position, 0, 0, 0)[:3] for name, position in saved["sources"].items()},
            exhausted=tuple(saved.get("exhausted", ())),
            past_plan=saved.get("past_plan", True),
            past_plan_samples=saved.get("past_plan_samples", 0),
            mixer_draws=saved["mixer_draws"],
            skipped=dict(saved["skipped"]),
            samples_seen=saved["samples_seen"],
            bucket_batches_taken=saved.get("bucket_batches_taken", 0),
        )


# LocCa's decoder tasks (contrastive.data.boxes draws them), in the order of their ids in Batch.decoder_tasks.
DECODER_TASK_NAMES = ("caption", "referring", "grounded_caption")


@dataclass
class TeacherTargets:
    """What one frozen teacher says about a batch (contrastive.train.teachers runs it, or a reinforced data set
    stored it): the distillation losses' targets. No gradient flows into any of them."""

    image_features: torch.Tensor  # (B, D_t) L2-normalised
    text_features: torch.Tensor | None = None  # (B, D_t) L2-normalised, where the teacher has a text tower
    logit_scale: torch.Tensor | None = None  # scalar, exponentiated
    logit_bias: torch.Tensor | None = None  # scalar, SigLIP teachers
    patch_tokens: torch.Tensor | None = None  # (B, N_t, W_t), online open_clip ViT teachers only

    __reduce__ = _reduce_by_value

    def pin_memory(self) -> TeacherTargets:
        return replace(self, **{f.name: getattr(self, f.name).pin_memory()
                                for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})

    def to(self, device: torch.device, non_blocking: bool = True) -> TeacherTargets:
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                                for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})


@dataclass
class Batch:
    """One local batch as the data pipeline yields it.

    ``stream_position`` records where in its stream the worker that produced this batch stands after it,
    so the trainer can checkpoint an exact data position.
    """

    # (B, 3, H, W) float, normalised; uint8 as the training stream yields it (BatchNormalize); NaFlex: (B, N, P*P*3)
    # float patches, normalised in the stream's workers (contrastive.data.naflex)
    images: torch.Tensor
    tokens: torch.Tensor  # (B, L) int64, 0 = padding
    keys: list[str] = field(default_factory=list)
    labels: torch.Tensor | None = None  # (B,) int64, present on labelled data
    global_views: torch.Tensor | None = None  # (B, G, 3, g, g) extra augmented views (data.global_views)
    local_views: torch.Tensor | None = None  # (B, L, 3, l, l) smaller crops (data.local_views)
    # LocCa (contrastive.data.boxes): each sample's decoder text "prompt target" (0 = padding), how many of its
    # tokens (start token included) are prompt and not scored, and its task (0 caption, 1 referring, 2 grounded)
    decoder_tokens: torch.Tensor | None = None  # (B, L) int64
    decoder_prompt_lengths: torch.Tensor | None = None  # (B,) int64
    decoder_tasks: torch.Tensor | None = None  # (B,) int64
    stream_position: StreamPosition | None = None
    # Distillation: the teachers' view of the same augmentation, uint8 (B, 3, T, T) at the largest teacher's
    # resolution (contrastive.train.teachers resizes and normalises it per teacher), the captions for the teachers'
    # tokenizers, and each teacher's targets (filled by the trainer, or read from a reinforced data set).
    teacher_images: torch.Tensor | None = None
    captions: list[str] = field(default_factory=list)
    teachers: dict[str, TeacherTargets] = field(default_factory=dict)
    # NaFlex batches (data.naflex_seq_lens) only: each patch's (row, column) in its image's grid, and which
    # patches are real rather than padding up to the step's sequence length N.
    patch_coord: torch.Tensor | None = None  # (B, N, 2) int64
    patch_valid: torch.Tensor | None = None  # (B, N) bool
    # data.decode_device=cuda: per sample, the JPEG's bytes and its crop (top, left, height, width, flip) in the
    # full-resolution image, for the trainer to decode on its device into `images`; None where the worker decoded
    # the sample itself (not a JPEG), whose crop is already in `images`.
    jpeg_bytes: list[bytes | None] = field(default_factory=list)
    jpeg_crops: list[tuple[int, int, int, int, bool]] = field(default_factory=list)
    # (DataLoader worker, its batch number) when `images` is that worker's reusable shared memory, which the main
    # process copies out of and releases (contrastive.data.batch_memory.StreamLoader)
    shared_images: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    __reduce__ = _reduce_by_value

    def pin_memory(self) -> Batch:
        """Page-locked copies of the tensors. DataLoader(pin_memory=True) calls this (it passes a dataclass through
        unpinned otherwise), so that `to(device, non_blocking=True)` is a copy that does not wait."""
        pinned = {f.name: getattr(self, f.name).pin_memory() for f in fields(self)
                  if isinstance(getattr(self, f.name), torch.Tensor)}
        teachers = {name: targets.pin_memory() for name, targets in self.teachers.items()}  # reinforced data's
        return replace(self, teachers=teachers, **pinned)

    def to(self, device: torch.device, non_blocking: bool = True) -> Batch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        teachers = {name: targets.to(device, non_blocking) for name, targets in self.teachers.items()}
        return replace(self, teachers=teachers, **moved)


@dataclass
class ModelOutput:
    """What every model returns; objectives read the fields they need.

    Features are L2-normalised. ``logit_scale`` is already exponentiated (a temperature multiplier).
    """

    image_features: torch.Tensor | None = None  # (B, D)
    text_features: torch.Tensor | None = None  # (B, D)
    logit_scale: torch.Tensor | None = None  # scalar
    logit_bias: torch.Tensor | None = None  # scalar, SigLIP only
    caption_logits: torch.Tensor | None = None  # (B, L, V), captioning objectives only
    caption_targets: torch.Tensor | None = None  # (B, L) int64, -100 where ignored
    # Self-distillation (contrastive.models.self_distillation), once it is on: prototype logits over K prototypes.
    student_local_logits: torch.Tensor | None = None  # (B, L, K) the student's local crops
    teacher_global_logits: torch.Tensor | None = None  # (B, G, K) the teacher's global views, no gradient
    student_patch_logits: torch.Tensor | None = None  # (B, G, N, K) the student's masked global views, per patch
    teacher_patch_logits: torch.Tensor | None = None  # (B, G, N, K) the teacher's unmasked ones, no gradient
    patch_mask: torch.Tensor | None = None  # (B, G, N) bool, the patches the student saw masked
    global_centre: torch.Tensor | None = None  # (K,) the teacher's centre for pooled outputs
    patch_centre: torch.Tensor | None = None  # (K,) and for patches
    # Distillation's adaptor heads (contrastive.models.distillation_heads): teacher name -> the student's pooled
    # image features (B, D_t) and patch tokens (B, N_s, W_t) mapped into that teacher's space.
    adapted_features: dict[str, torch.Tensor] = field(default_factory=dict)
    adapted_patch_tokens: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_float32(self) -> ModelOutput:
        """The same outputs with every floating-point tensor in fp32: objectives compute in fp32 whatever the towers
        ran in (bf16 autocast, or FSDP's bf16 parameters)."""
        cast = {f.name: getattr(self, f.name).float() for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor) and getattr(self, f.name).is_floating_point()}
        adapted = {name: {teacher: value.float() for teacher, value in getattr(self, name).items()}
                   for name in ("adapted_features", "adapted_patch_tokens")}
        return replace(self, **cast, **adapted)


@dataclass
class LossOutput:
    """A scalar loss to minimise and detached metrics to log (name -> value)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    # Means over the global batch the model takes in after the optimiser step (self-distillation's teacher
    # centres: name -> (K,)), as the loss is the one place that sees every micro-batch and rank.
    teacher_statistics: dict[str, torch.Tensor] = field(default_factory=dict)


class Collectives(Protocol):
    """How losses and the trainer reach the other ranks; contrastive.dist.collectives implements it for one process
    and for torchrun ranks."""

    rank: int
    world_size: int
    device: torch.device  # where tensors handed to these collectives must live

    def all_gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's (B, ...) tensor along dim 0 into (world_size * B, ...), differentiably."""

    def ring_exchange_with_grad(
        self, to_next: torch.Tensor, to_previous: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Send `to_next` to rank + 1 and `to_previous` (if given) to rank - 1, around the ring, at the same time.

        Returns (what rank - 1 sent to its next, what rank + 1 sent to its previous or None). Every rank passes
        tensors of the same shape. Gradients of the received tensors travel back to the ranks that sent them.
        """

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over ranks, without gradient (for metrics)."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, without gradient (for counters)."""

    def broadcast_object(self, obj: Any, src: int = 0) -> Any: ...

    def all_gather_object(self, obj: Any) -> list[Any]: ...

    def barrier(self) -> None: ...


class Evaluator(Protocol):
    """Scores an encoder on one dataset (contrastive.eval): `name` prefixes its metrics in a training log.

    `encoder` is a contrastive.encoders.LoadedEncoder (model, preprocessing, tokenizer); that layer sits above
    this leaf, so it is not named in the annotation.
    """

    name: str

    def run(self, encoder: Any, device: torch.device) -> dict[str, float]: ...
