"""The trainer: builds everything in one fixed order, then runs a short loop.

Order: process group -> model -> data parallel wrap -> optimiser and schedule -> checkpoint restore ->
data (it needs the restored stream position) -> loop. The evaluators arrive built (the entry point builds them
from `cfg.eval`), as training and evaluation never import each other.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from contrastive import checkpoint_io
from contrastive.config import TrainConfig, validate
from contrastive.data.loader import build_train_loader, plan_run
from contrastive.data.reinforced import check_set_teachers
from contrastive.data.remote import RECOVERED_READ
from contrastive.data.shards import expand_shards
from contrastive.data.stream import CPU_DECODED, SHARD_LOSS_REASONS, SKIP_REASONS
from contrastive.data.transforms import BatchNormalize, decode_on_device
from contrastive.dist import DistEnv, init_distributed
from contrastive.dist.parallel import gather_model_state, is_sharded, parallelize
from contrastive.encoders import encoder_from_model, preprocess_from_config
from contrastive.errors import ConfigError, TrainingDiverged
from contrastive.losses import build_loss, list_losses
from contrastive.models import build_model, build_tokenizer, list_models
from contrastive.models.ema import ExponentialMovingAverage
from contrastive.models.locking import apply_locks
from contrastive.models.randomness import random_state, restore_random_state
from contrastive.train import checkpoint as ckpt
from contrastive.train.flops import flops_per_sample, throughput_metrics
from contrastive.train.host_memory import reuse_freed_host_memory
from contrastive.train.metrics import MetricsLogger
from contrastive.train.optim import (
    NonfiniteReport,
    NonfiniteSteps,
    build_optimizer,
    build_scheduler,
    describe,
    optimizer_step,
)
from contrastive.train.stages import build_stages, stage_at
from contrastive.train.step import build_forward_backward
from contrastive.train.teachers import Teachers, check_resumed_teachers
from contrastive.types import Evaluator, StreamPosition

log = logging.getLogger(__name__)
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: SLURM's --signal warning before the time limit


@dataclass
class TrainResult:
    final_step: int
    final_loss: float | None
    eval_metrics: dict[str, float]
    preempted: bool = False
    nonfinite_steps_skipped: int = 0


def _set_threads(cfg: TrainConfig) -> None:
    """trainer.threads_per_process, or by default the cores of this rank's share that its data workers leave. With
    one data worker on two cores, two training threads made benchmarks/reinforced_step_time.py's plain CPU step 111 ms
    against 74-77 ms with one (medians; benchmarks/results/reinforced_step_time_quiet_6x20_2threads.json,
    reinforced_step_time_quiet_10x20.json and its _run2)."""
    threads = cfg.trainer.threads_per_process
    if threads is None:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        threads = max(1, (os.cpu_count() or 1) // local_ranks - cfg.data.num_workers)
    torch.set_num_threads(threads)


class Trainer:
    """`evaluators` (the entry point builds them from `cfg.eval`) run when `cfg.eval` says; with none, nothing is
    evaluated."""

    def __init__(self, cfg: TrainConfig, env: DistEnv | None = None, evaluators: Sequence[Evaluator] = ()) -> None:
        self.cfg = cfg
        self.env = env or init_distributed(cfg.dist.device, cfg.dist.backend, cfg.dist.timeout_minutes)
        validate(cfg, self.env.world_size, model_archs=list_models(), loss_names=list_losses())
        _set_threads(cfg)
        if cfg.trainer.reuse_freed_host_memory and self.env.device.type == "cpu":
            reuse_freed_host_memory()  # before anything large is allocated; loader workers fork with it
        torch.manual_seed(cfg.seed + self.env.rank)
        random.seed(cfg.seed + self.env.rank)
        if cfg.trainer.deterministic:
            torch.use_deterministic_algorithms(True)
        self.run_dir = Path(cfg.run_dir)
        resume = cfg.resume
        if resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
            resume = "latest"  # torchrun restarted the workers after a failure: continue, do not start over
        if resume is None and checkpoint_io.list_checkpoints(self.run_dir):
            raise ConfigError(f"{self.run_dir} already holds checkpoints of another run; "
                             f"pass resume=latest to continue it, or choose another name=")
        if self.env.is_main:
            for partial in ckpt.remove_partial_writes(self.run_dir):
                log.warning("removed %s, left by a checkpoint write that did not finish", partial)
        resume_from = ckpt.load_resume_state(resume, self.run_dir)

        distill = cfg.loss.distillation
        # Teachers: frozen, loaded before the student (its adaptor heads take their widths). A reinforced data set
        # holds their outputs; they are still read then, for their hashes and widths, but never run.
        self.teachers = Teachers(distill, self.env, cfg.dist.strategy) if distill.teachers else None
        if self.teachers is not None and distill.reinforced:  # the stored embeddings must be these teachers'
            for source in cfg.data.sources:
                check_set_teachers(expand_shards(source.shards), source.name, self.teachers.hashes)
        self.model = build_model(cfg.model, cfg.loss.self_distillation).to(self.env.device)
        if self.teachers is not None and (distill.feature_weight or distill.patch_weight):
            self.model.attach_distillation_heads(self.teachers.widths(), distill.adaptor_hidden)
            self.model.distillation_heads.to(self.env.device)
        self.model.randomness.place(self.env.device, cfg.seed + self.env.rank)  # patch dropout, CapPa's draw
        apply_locks(self.model, cfg.lock)  # before the wrap and the optimiser, which keep only trainable parameters
        self.tokenizer = build_tokenizer(cfg.model)
        preprocess = preprocess_from_config(cfg.model)
        self.normalize = BatchNormalize(preprocess.mean, preprocess.std)  # the stream's uint8 batches, on the device
        self.bf16 = cfg.trainer.precision == "bf16" or (cfg.trainer.precision == "auto"
                                                        and self.env.device.type == "cuda")
        self.parallel_model = parallelize(self.model, self.env, cfg.dist.strategy, cfg.dist.activation_checkpointing,
                                          cfg.trainer.compile, bf16=self.bf16,
                                          static_lengths=len(cfg.data.naflex_seq_lens))
        self.objective = build_loss(cfg.loss)
        self.forward_backward = build_forward_backward(self.parallel_model, self.objective, self.env.collectives,
                                                       cfg.trainer.accumulation_steps,
                                                       self._autocast, randomness=self.model.randomness)
        self.flops_per_sample: dict[int, float] = {}  # stage index -> model FLOPs per sample at its sizes
        self.flops_per_seq_len: dict[int, float] = {}  # NaFlex (one stage): sequence length -> the same
        self._window_flops: list[float] = []  # FLOPs per sample of each step since the last log step
        plan = plan_run(cfg.data, world_size=self.env.world_size, seed=cfg.seed)  # None for an endless stream
        if plan is not None:  # every rank computes the same last step, so none waits in a collective
            cfg.trainer.max_steps = min(cfg.trainer.max_steps, plan.steps)
        self.distiller = getattr(self.model, "self_distillation", None)  # SigLIP 2's, when loss.self_distillation
        if self.distiller is not None:
            self.distiller.schedule(cfg.trainer.max_steps)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)
        self.ema = None if cfg.trainer.ema.decay is None else \
            ExponentialMovingAverage(self.model, cfg.trainer.ema.decay, cfg.trainer.ema.warmup)
        self.checkpointer = ckpt.Checkpointer(
            self.run_dir, ckpt.resolve_format(cfg.trainer.checkpoint_format, cfg.dist.strategy), self.env,
            cfg.trainer.keep_last_checkpoints, cfg.trainer.keep_every_steps)
        self.stages = build_stages(cfg)
        if self.env.is_main:
            log.info("%s", describe(self.model, cfg.optim, cfg.trainer.max_steps))

        self.step = self.saved_step = 0
        self.data_positions: dict[int, StreamPosition] = {}  # logical data worker -> its latest position
        if resume_from is not None:
            self._restore(*resume_from)
        self.stage = stage_at(self.stages, self.step)
        self.loader = self._build_loader()
        self.evaluators = list(evaluators)
        self.config_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        self.logger = MetricsLogger(
            cfg.logger, self.run_dir, cfg.name, self.config_dict, enabled=self.env.is_main,
            total_steps=cfg.trainer.max_steps, start_step=self.step, progress_bar=cfg.trainer.progress_bar,
        )

    def _build_loader(self):
        """The data loader of the current stage, continuing the stream from the positions reached so far."""
        if len(self.stages) > 1 and self.env.is_main:
            log.info("%s", self.stage.describe())
        reinforced = self.teachers is not None and self.cfg.loss.distillation.reinforced
        preprocess = self.stage.preprocess(preprocess_from_config(self.cfg.model))
        self.decode_interpolation = preprocess.interpolation  # data.decode_device=cuda resizes on the device
        return build_train_loader(
            self.cfg.data, preprocess,
            self.stage.tokenizer(self.tokenizer), rank=self.env.rank, world_size=self.env.world_size,
            seed=self.cfg.seed, start_step=self.step, positions=self.data_positions,
            pin_memory=self.env.device.type == "cuda", locca=getattr(self.objective, "locca", None),
            teacher_view=self.teachers.view if self.teachers is not None and not reinforced else None,
            reinforced=tuple(self.teachers.hashes) if reinforced else (),
        )

    def _autocast(self):
        # Sharded towers already compute in bf16 under FSDP's mixed-precision policy; weights stay fp32 either way.
        enabled = self.bf16 and not is_sharded(self.model)
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _catch_preemption(self) -> None:
        self.preemption_requested = False

        def request_stop(signum, frame) -> None:
            log.warning("rank %d received %s: checkpointing at the next log step", self.env.rank,
                        signal.Signals(signum).name)
            self.preemption_requested = True

        self._previous_handlers = {signum: signal.signal(signum, request_stop) for signum in PREEMPTION_SIGNALS}

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)

    def train(self) -> TrainResult:
        """The loop. Nothing in a step waits for the device except at log steps (every trainer.log_every): there one
        all-reduce brings the metrics, the skip counts and any rank's preemption request, and the non-finite
        counters are read. So every rank stops for preemption at the same step, and a run of non-finite steps is
        noticed at the log step that follows it."""
        cfg, env = self.cfg, self.env
        batches = iter(self.loader)
        self.nonfinite = NonfiniteSteps(env.device)
        self._catch_preemption()
        self._window = (time.perf_counter(), self.step)
        preempted, metrics = False, {}
        try:
            while self.step < cfg.trainer.max_steps and not preempted:
                if self.step >= self.stage.end_step:  # a new stage: new sizes, the stream where it stands
                    self.stage = stage_at(self.stages, self.step)
                    del batches  # stops its workers; their prefetched batches are read again at the new size
                    self.loader = self._build_loader()
                    batches = iter(self.loader)
                # uint8 through pinned memory, copied without waiting, converted to float on the device
                batch = next(batches).to(env.device, non_blocking=True)
                if batch.jpeg_bytes:  # data.decode_device=cuda: the workers sent JPEGs and their crops
                    batch = decode_on_device(batch, self.decode_interpolation, env.device)
                batch = self.normalize.batch(batch)
                self.data_positions[batch.stream_position.worker] = batch.stream_position
                if self.distiller is not None:
                    self.distiller.begin_step(self.step, self.model.visual)
                if self.teachers is not None and not cfg.loss.distillation.reinforced:
                    batch.teachers = self.teachers.targets(batch)
                result = self.forward_backward(batch)
                grad_norm, stepped = optimizer_step(self.model.parameters(), self.optimizer, cfg.optim.grad_clip_norm)
                if self.distiller is not None:
                    self.distiller.end_step(self.step, self.model.visual, result.teacher_statistics)
                self.nonfinite.record(stepped)
                self.scheduler.step()
                self.step += 1
                if self.ema is not None:
                    self.ema.update(self.step)
                self.logger.advance()
                self._count_flops(batch)
                if self.step % cfg.trainer.log_every == 0 or self.step == cfg.trainer.max_steps:
                    metrics, preempted = self._log(result, grad_norm)
                if self.step % cfg.trainer.checkpoint_every == 0 or self.step == cfg.trainer.max_steps or preempted:
                    self.save()
                if (cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and self.step < cfg.trainer.max_steps
                        and not preempted):
                    self.evaluate()
        finally:
            self._restore_signal_handlers()
        self.checkpointer.close()  # the last checkpoint is committed before the run reports its end
        if preempted:
            log.warning("stopped for preemption at step %d; resume=latest continues from here", self.step)
        eval_metrics = self.evaluate() if cfg.eval.at_end and not preempted else {}
        self.logger.close()
        return TrainResult(self.step, metrics.get("loss"), eval_metrics, preempted=preempted,
                           nonfinite_steps_skipped=self.nonfinite.read_total())

    def _log(self, result, grad_norm: torch.Tensor) -> tuple[dict[str, float], bool]:
        """Log the metrics of the steps since the previous log step; returns them and whether any rank must stop."""
        window_start, window_first_step = self._window
        metrics, preempted = self._log_step_reduction(result, grad_norm, self.nonfinite)
        elapsed = time.perf_counter() - window_start  # after the reduction: its host sync ends the window's work
        metrics["samples_per_second"] = (self.step - window_first_step) * self.cfg.data.batch_size / max(elapsed, 1e-9)
        metrics.update(self._throughput(metrics["samples_per_second"]))
        self.logger.log(self.step, metrics)
        self._window = (time.perf_counter(), self.step)
        return metrics, preempted

    def _count_flops(self, batch) -> None:
        """Note the step's model FLOPs per sample, counted the first time its sizes come: once per stage, and for
        NaFlex once per sequence length, which changes from step to step. Every rank counts at the same step (the
        sizes are a function of the step; under FSDP the count's forward gathers weights)."""
        if batch.patch_coord is not None:
            table, key, what = self.flops_per_seq_len, batch.images.shape[1], "sequence length"
        else:
            table, key, what = self.flops_per_sample, self.stage.index, "stage"
        if key not in table:
            table[key] = flops_per_sample(self.model, self.objective, batch, autocast=self._autocast)
            if (len(self.stages) > 1 or table is self.flops_per_seq_len) and self.env.is_main:
                log.info("%s %d: %.4g model FLOPs per sample", what, key, table[key])
        self._window_flops.append(table[key])

    def _throughput(self, samples_per_second: float) -> dict[str, float]:
        """FLOP/s (and MFU) of the steps since the last log step, each at its own sizes' FLOPs per sample."""
        window, self._window_flops = self._window_flops, []
        return throughput_metrics(sum(window) / len(window), samples_per_second, self.env.world_size,
                                  self.cfg.trainer.peak_flops_per_device)

    def _log_step_reduction(self, result, grad_norm: torch.Tensor,
                            nonfinite: NonfiniteSteps) -> tuple[dict[str, float], bool]:
        """(metrics, whether any rank asked to stop): one all-reduce and one host sync for everything a log step needs.

        Loss terms are averaged over ranks; skip counts (every logical worker's latest, since a batch carries only
        its own worker's) and preemption requests are summed. The gradient norm and the non-finite counters are the
        same on every rank.
        """
        names = ["loss", *result.metrics]
        terms = torch.stack([result.loss.detach().float(), *(v.detach().float() for v in result.metrics.values())])
        skipped = [float(sum(p.skipped.get(reason, 0) for p in self.data_positions.values()))
                   for reason in (*SKIP_REASONS, RECOVERED_READ, CPU_DECODED)]
        counts = torch.tensor([*skipped, float(self.preemption_requested)], device=self.env.device)
        summed = self.env.collectives.all_reduce_sum(torch.cat([terms, counts]))
        values = torch.cat([summed, grad_norm.detach().float().reshape(1), nonfinite.counters()]).tolist()
        terms_sum, values = values[:len(names)], values[len(names):]
        reasons = len(SKIP_REASONS)
        skipped_sum, recovered_reads, cpu_decoded = values[:reasons], values[reasons], values[reasons + 1]
        values = values[reasons + 2:]
        preemption_requests, grad_norm_value, *counters = values
        self._check_nonfinite(nonfinite.read(counters), result)
        metrics = {name: total / self.env.world_size for name, total in zip(names, terms_sum)}
        metrics["data_skipped_samples"] = sum(skipped_sum)
        metrics.update({f"data_skipped/{reason}": count for reason, count in zip(SKIP_REASONS, skipped_sum) if count})
        metrics["data_lost_shards"] = sum(count for reason, count in zip(SKIP_REASONS, skipped_sum)
                                          if reason in SHARD_LOSS_REASONS)
        metrics["data_recovered_reads"] = recovered_reads  # remote reads that failed and succeeded on a retry
        if self.cfg.data.decode_device == "cuda":  # samples the workers decoded (not JPEGs), so far
            metrics["data_cpu_decoded"] = cpu_decoded
        metrics["grad_norm"] = grad_norm_value
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["nonfinite_steps_skipped"] = float(nonfinite.total)
        return metrics, preemption_requests > 0

    def _check_nonfinite(self, since_last_read: NonfiniteReport, result) -> None:
        if since_last_read.skipped:
            log.warning("%d step(s) up to step %d skipped for a non-finite loss or gradients (loss=%s)",
                        since_last_read.skipped, self.step, float(result.loss.detach()))
        if since_last_read.longest_run < self.cfg.trainer.max_nonfinite_steps:
            return
        last_step = self.step - 1
        where = f"ending at step {last_step}" if since_last_read.ongoing_run == since_last_read.longest_run \
            else f"before step {last_step}"
        last = checkpoint_io.list_checkpoints(self.run_dir)
        raise TrainingDiverged(
            f"{since_last_read.longest_run} non-finite steps in a row {where} "
            f"(loss terms: { {k: float(v) for k, v in result.metrics.items()} }); "
            f"last good checkpoint: {last[-1][1] if last else 'none'}"
        )

    def evaluate(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        model = self._evaluation_model() if self.evaluators else None
        if self.env.is_main and self.evaluators:
            model.eval()
            encoder = encoder_from_model(model, self.cfg.name)
            for evaluator in self.evaluators:
                result = evaluator.run(encoder, self.env.device)
                metrics.update({f"eval/{evaluator.name}/{k}": v for k, v in result.items()})
            self.model.train()
            self.logger.log(self.step, metrics)
        return self.env.collectives.broadcast_object(metrics)

    def _evaluation_model(self) -> torch.nn.Module | None:
        """The model rank 0 evaluates. Alone it cannot run a sharded model, so every rank helps gather a plain copy."""
        if not is_sharded(self.model):
            return self.model
        state = gather_model_state(self.model)
        if not self.env.is_main:
            return None
        copy = build_model(self.cfg.model, self.cfg.loss.self_distillation).to(self.env.device)
        copy.load_state_dict({k: v for k, v in state.items() if not k.startswith("distillation_heads.")})
        return copy

    def save(self) -> None:
        if self.step == self.saved_step:
            return
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise TrainingDiverged(f"model weights are not finite at step {self.step}; not checkpointing them")
        positions = self.env.collectives.all_gather_object(
            {worker: position.to_dict() for worker, position in self.data_positions.items()})
        rng = self.env.collectives.all_gather_object(random_state(self.model.randomness))
        self.saved_step = self.step
        # Name-keyed states (whole in a single file, sharded in DCP's): either loads under any strategy and world size.
        state = {
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "samples_seen": self.step * self.cfg.data.batch_size,
            "world_size": self.env.world_size,
            "data_positions": positions,
            "rng": rng,
            "config": self.config_dict,
            "git_commit": ckpt.git_commit(),
        }
        if self.teachers is not None:
            state["teacher_hashes"] = self.teachers.hashes
        self.checkpointer.save(self.step, state, self.model, self.optimizer, self.ema)

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        check_resumed_teachers(state.get("teacher_hashes", {}), self.teachers.hashes if self.teachers else {})
        self.checkpointer.restore(path, state, self.model, self.optimizer, self.ema)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = self.saved_step = state["step"]
        if state["world_size"] == self.env.world_size:
            self.data_positions = {worker: StreamPosition.from_dict(saved)
                                   for worker, saved in state["data_positions"][self.env.rank].items()}
            restore_random_state(self.model.randomness, state["rng"][self.env.rank])
        else:
            log.warning("checkpoint was written by %d ranks, this run has %d: the data stream restarts with a "
                        "fresh seed instead of resuming its exact position", state["world_size"], self.env.world_size)
            self.cfg.seed += self.step
        if self.env.is_main:
            log.warning("resuming from %s at step %d", path, self.step)
