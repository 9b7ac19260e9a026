"""Forward, loss and backward of one optimiser step, over one local batch or K micro-batches of it.

The trainer hands every step its whole local batch (data.batch_size / world size), so data positions, resume and
finite-run plans stay in units of steps; splitting into micro-batches happens here, as views of that batch.

- `SingleBatch`: one forward and backward (K = 1).
Which one runs is the objective's declared `accumulation` (contrastive.losses.registry):
- `SummedMicroBatches` (per_example_mean): loss = mean of the K micro-batch losses. Exact for objectives whose
  loss is a mean of per-example terms over equal micro-batches (CapPa).
- `FeatureCache` (feature_cache) (GradCache, Gao et al. 2021; open_clip's accum_freq): pass 1 computes every
  micro-batch's features without a graph; the loss runs once on the cached features of the whole local batch (so every
  negative of the global batch is scored, across ranks too) and keeps its gradients with respect to them; pass 2 re-runs
  each micro-batch with a graph and backpropagates those gradients. The gradients equal one step on the whole batch;
  memory is one micro-batch's activations plus the (B, D) features. Pass 2 replays pass 1's random states per
  micro-batch (the model's generator, and torch's global ones for parts we do not own), so random model parts (patch
  dropout, timm's drop-path) draw the same values in both passes.
  With an objective that also has per-example terms (feature_cache_and_per_example_mean: LocCa's decoder), pass 1
  leaves out their inputs (the decoder texts), the cached loss is the feature terms alone, and pass 2 also
  backpropagates weight * (sum of the micro-batch's per-example terms) / B from its own forward: their mean over the
  whole batch, split exactly, without caching any (B, T, V) logits.

Precision: the towers run under `autocast` (bf16 when trainer.precision asks for it); the objective always runs
outside it, on fp32 outputs, so logits, the temperature, the bias and the loss itself are fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import KW_ONLY, dataclass, fields, replace

import torch
from torch import nn

from contrastive.errors import ConfigError
from contrastive.losses.registry import (
    FEATURE_CACHE,
    FEATURE_CACHE_AND_PER_EXAMPLE_MEAN,
    PER_EXAMPLE_MEAN,
    Objective,
    losses_accumulating_by,
)
from contrastive.models.randomness import ModelRandomness, random_state, restore_random_state
from contrastive.types import Batch, Collectives, LossOutput, ModelOutput

# (B, ...), concatenated over micro-batches; the loss's gradients with respect to them are cached
PER_EXAMPLE_FIELDS = ("image_features", "text_features", "student_local_logits", "student_patch_logits")
SHARED_FIELDS = ("logit_scale", "logit_bias")  # scalars, the same in every micro-batch
# Without gradient: the self-distillation teacher's outputs and masks (per example), its centres (shared)
PER_EXAMPLE_CONSTANTS = ("teacher_global_logits", "teacher_patch_logits", "patch_mask")
SHARED_CONSTANTS = ("global_centre", "patch_centre")
# The batch fields only the per-example terms read (the LocCa decoder's texts): pass 1 leaves them out, so the
# decoder runs once per micro-batch, in pass 2
PER_EXAMPLE_INPUTS = ("decoder_tokens", "decoder_prompt_lengths")


def batch_rows(batch: Batch, rows: slice) -> Batch:
    """The batch's examples in `rows` (views, no copies)."""
    optional = {name: None if getattr(batch, name) is None else getattr(batch, name)[rows]
                for name in ("labels", "global_views", "local_views", "teacher_images", "patch_coord",
                             "patch_valid", "decoder_tokens", "decoder_prompt_lengths", "decoder_tasks")}
    teachers = {name: replace(targets, **{field.name: getattr(targets, field.name)[rows] for field in fields(targets)
                                          if getattr(targets, field.name) is not None
                                          and getattr(targets, field.name).ndim > 0})
                for name, targets in batch.teachers.items()}  # per-example targets; the scale and bias are shared
    return replace(batch, images=batch.images[rows], tokens=batch.tokens[rows], keys=batch.keys[rows],
                   captions=batch.captions[rows], teachers=teachers, **optional)


def forward(model: nn.Module, batch: Batch) -> ModelOutput:
    """The model on a batch; the extra views, NaFlex patch positions and decoder texts go only to models that take
    them (they are there only then)."""
    views = {name: getattr(batch, name) for name in ("global_views", "local_views", "patch_coord", "patch_valid",
                                                     "decoder_tokens", "decoder_prompt_lengths")
             if getattr(batch, name) is not None}
    return model(batch.images, batch.tokens, **views)


def micro_batches(batch: Batch, steps: int) -> list[Batch]:
    """Split a local batch into `steps` equal micro-batches."""
    if len(batch) % steps:
        raise ConfigError(f"local batch of {len(batch)} is not divisible by trainer.accumulation_steps={steps}")
    size = len(batch) // steps
    return [batch_rows(batch, slice(index * size, (index + 1) * size)) for index in range(steps)]


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the data-parallel gradient reduction in backward passes that are not the step's last."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DistributedDataParallel
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2 (fully_shard)
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


@dataclass
class _Step:
    model: nn.Module  # possibly wrapped for data parallelism
    objective: Objective
    collectives: Collectives
    autocast: Callable[[], AbstractContextManager] = nullcontext


class SingleBatch(_Step):
    def __call__(self, batch: Batch) -> LossOutput:
        with self.autocast():
            output = forward(self.model, batch)
        result = self.objective(output.to_float32(), batch, self.collectives)
        result.loss.backward()
        return result


@dataclass
class SummedMicroBatches(_Step):
    steps: int = 2

    def __call__(self, batch: Batch) -> LossOutput:
        results = []
        parts = micro_batches(batch, self.steps)
        for index, part in enumerate(parts):
            with gradient_sync(self.model, enabled=index == len(parts) - 1):
                with self.autocast():
                    output = forward(self.model, part)
                result = self.objective(output.to_float32(), part, self.collectives)
                (result.loss / self.steps).backward()
            results.append(result)
        def mean(values: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(values).mean(0)

        return LossOutput(
            loss=mean([r.loss.detach() for r in results]),
            metrics={name: mean([r.metrics[name] for r in results]) for name in results[0].metrics},
            teacher_statistics={name: mean([r.teacher_statistics[name] for r in results])
                                for name in results[0].teacher_statistics},
        )


@dataclass
class FeatureCache(_Step):
    steps: int = 2
    _: KW_ONLY
    randomness: ModelRandomness  # the model's generator, whose draws pass 2 replays

    def __call__(self, batch: Batch) -> LossOutput:
        parts = micro_batches(batch, self.steps)
        split = self.objective.accumulation == FEATURE_CACHE_AND_PER_EXAMPLE_MEAN  # a PerExampleSplit
        # Pass 1: features of every micro-batch, no graph.
        rng_before, outputs = [], []
        with torch.no_grad(), self.autocast():
            for part in parts:
                rng_before.append(random_state(self.randomness))
                features_only = replace(part, **dict.fromkeys(PER_EXAMPLE_INPUTS)) if split else part
                outputs.append(forward(self.model, features_only))
        rng_after = random_state(self.randomness)
        cached = self._concatenate(outputs)
        leaves = {name: getattr(cached, name) for name in (*PER_EXAMPLE_FIELDS, *SHARED_FIELDS)
                  if getattr(cached, name) is not None}
        for tensor in leaves.values():
            tensor.requires_grad_(True)
        # The loss over the whole local batch, and its gradients with respect to the cached outputs.
        result = (self.objective.feature_terms if split else self.objective)(cached, batch, self.collectives)
        result.loss.backward()
        # Pass 2: each micro-batch again, with a graph, backpropagating its slice of the cached gradients. The
        # shared scale and bias get 1/K of theirs each time, so every parameter takes part in every backward.
        size = len(batch) // self.steps
        per_example = []  # (B/K,) per micro-batch, detached, for the logged total
        for index, part in enumerate(parts):
            restore_random_state(self.randomness, rng_before[index])
            rows = slice(index * size, (index + 1) * size)
            with gradient_sync(self.model, enabled=index == len(parts) - 1):
                with self.autocast():
                    output = forward(self.model, part)
                tensors, grads = [], []
                for name, leaf in leaves.items():
                    tensors.append(getattr(output, name))
                    grad = leaf.grad[rows] if name in PER_EXAMPLE_FIELDS else leaf.grad / self.steps
                    grads.append(grad.to(tensors[-1].dtype))
                if split:  # d(weight * mean over the B examples)/d(each example's term) = weight / B
                    terms = self.objective.per_example_terms(output.to_float32(), part)
                    tensors.append(terms)
                    grads.append(torch.full_like(terms, self.objective.per_example_weight / len(batch)))
                    per_example.append(terms.detach())
                torch.autograd.backward(tensors, grads)
        restore_random_state(self.randomness, rng_after)
        if split:
            result = self.objective.combine(LossOutput(loss=result.loss.detach(), metrics=result.metrics),
                                            torch.cat(per_example), batch)
        return LossOutput(loss=result.loss.detach(), metrics=result.metrics,
                          teacher_statistics=result.teacher_statistics)

    @staticmethod
    def _concatenate(outputs: list[ModelOutput]) -> ModelOutput:
        values = {}
        for field in fields(ModelOutput):
            parts = [getattr(output, field.name) for output in outputs]
            if parts[0] is None or isinstance(parts[0], dict) and not parts[0]:  # absent, or no adaptor outputs
                continue
            if field.name in PER_EXAMPLE_FIELDS:
                values[field.name] = torch.cat(parts).detach().float()
            elif field.name in SHARED_FIELDS:
                values[field.name] = parts[0].detach().float().clone()
            elif field.name in PER_EXAMPLE_CONSTANTS:
                joined = torch.cat(parts)
                values[field.name] = joined.float() if joined.is_floating_point() else joined
            elif field.name in SHARED_CONSTANTS:
                values[field.name] = parts[0].float()
            else:
                raise ValueError(f"the feature cache cannot hold ModelOutput.{field.name}: it fits objectives that "
                                 f"declare accumulation={FEATURE_CACHE!r} (score features only)")
        return ModelOutput(**values)


def build_forward_backward(model: nn.Module, objective: Objective, collectives: Collectives, steps: int,
                           autocast: Callable[[], AbstractContextManager] = nullcontext, *,
                           randomness: ModelRandomness) -> _Step:
    """The step's forward-and-backward for `trainer.accumulation_steps=steps`, as the objective's declared
    accumulation allows; `randomness` is the (unwrapped) model's."""
    if steps == 1:
        return SingleBatch(model, objective, collectives, autocast)
    if objective.accumulation in (FEATURE_CACHE, FEATURE_CACHE_AND_PER_EXAMPLE_MEAN):
        return FeatureCache(model, objective, collectives, autocast, steps, randomness=randomness)
    if objective.accumulation == PER_EXAMPLE_MEAN:
        return SummedMicroBatches(model, objective, collectives, autocast, steps)
    raise ConfigError(
        f"trainer.accumulation_steps={steps} is not supported with {type(objective).__name__} (accumulation="
        f"{objective.accumulation!r}): a feature cache fits loss={'|'.join(losses_accumulating_by(FEATURE_CACHE))} "
        f"and summed micro-batches fit loss={'|'.join(losses_accumulating_by(PER_EXAMPLE_MEAN))} (both at once: "
        f"loss={'|'.join(losses_accumulating_by(FEATURE_CACHE_AND_PER_EXAMPLE_MEAN))}); use "
        f"trainer.accumulation_steps=1 with a smaller data.batch_size or more ranks"
    )
