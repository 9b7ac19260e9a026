"""Typed configuration schemas, registered in Hydra's ConfigStore.

`conf/train.yaml` composes on top of `TrainConfig`, so an unknown key or a value of the wrong type fails at
start-up with a message naming it. `validate` adds the checks types cannot express (ranges, choices,
divisibility) and raises `ConfigError` with one clear line. The registered model and loss names are passed to it:
the registries sit above this module.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from contrastive.errors import ConfigError


@dataclass
class ModelConfig:
    arch: str = "clip"  # registry name, see contrastive.models.list_models()
    open_clip_name: str | None = None  # start from an open_clip model config, e.g. ViT-B-32
    embed_dim: int | None = None  # overrides the open_clip config when set
    vision: dict[str, Any] = field(default_factory=dict)  # open_clip CLIPVisionCfg fields
    text: dict[str, Any] = field(default_factory=dict)  # open_clip CLIPTextCfg fields
    decoder: dict[str, Any] = field(default_factory=dict)  # caption decoder (CapPa, CoCa multimodal tower)
    quick_gelu: bool = False
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None
    max_logit_scale: float = 100.0
    pretrained: str | None = None  # a local checkpoint file; nothing is downloaded
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    interpolation: str = "bicubic"


@dataclass
class SelfDistillationConfig:
    """SigLIP 2's late self-distillation terms (conf/loss/siglip2.yaml states the sources of each default)."""

    enabled: bool = False
    start: float = 0.8  # fraction of trainer.max_steps at which the terms switch on
    prototypes: int = 1024  # K, the heads' output width
    head_hidden: int = 512
    head_bottleneck: int = 128
    teacher_temp: float = 0.04
    student_temp: float = 0.1
    centre_momentum: float = 0.9
    teacher_momentum: float = 0.996  # EMA momentum at the switch, raised to 1 by the end along a cosine
    mask_ratio: float = 0.5
    local_weight: float = 1.0
    masked_weight: float = 0.25


@dataclass
class TeacherConfig:
    """A frozen teacher, read by contrastive.encoders.load_encoder: a checkpoint or run directory of ours, an
    open_clip directory (or weights file with open_clip_name), or a transformers export."""

    name: str = "???"  # names its metrics and its embeddings in a reinforced data set
    path: str = "???"
    open_clip_name: str | None = None
    weight: float = 1.0  # multiplies every distillation term of this teacher (RADIO's per-teacher weights)


@dataclass
class DistillationConfig:
    """Distillation from frozen teachers (contrastive.losses.distillation); a term is on when its weight is > 0."""

    teachers: list[TeacherConfig] = field(default_factory=list)
    contrastive_weight: float = 0.0  # KL of the image-text softmax over the global batch (CLIP students)
    sigmoid_weight: float = 0.0  # per-pair sigmoid KL (SigLIP students)
    feature_weight: float = 0.0  # pooled image features through an adaptor head per teacher
    patch_weight: float = 0.0  # patch tokens through an adaptor head per teacher (online, open_clip ViT teachers)
    adaptor_hidden: int = 256  # the adaptor heads' hidden width
    precision: str = "auto"  # the teachers' compute: auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    # Read each sample's teacher embeddings (and the augmentation they were computed on) from a reinforced data
    # set (contrastive-data reinforce) instead of running the teachers.
    reinforced: bool = False


@dataclass
class LoccaConfig:
    """loss=siglip_locca: the decoder tasks (contrastive.data.boxes); see conf/loss/siglip_locca.yaml."""

    caption: float = 0.5  # chance a sample with boxes captions; samples without boxes always do
    referring: float = 0.25  # phrase in, box out
    grounded_caption: float = 0.25  # box in, phrase out
    location_bins: int = 100  # each coordinate is written as an integer in 0..location_bins-1
    decoder_weight: float = 1.0  # weight of the decoder loss beside the sigmoid loss


@dataclass
class LossConfig:
    name: str = "clip"  # registry name, see contrastive.losses.list_losses()
    block_size: int | None = None  # contrastive losses: score logits in blocks of this many columns (memory)
    parallel_prob: float = 0.75  # CapPa: chance an example uses parallel prediction instead of teacher forcing
    clip_weight: float = 1.0  # CoCa: weight of the contrastive term
    caption_weight: float = 2.0  # CoCa: weight of the captioning term
    label_smoothing: float = 0.0  # captioning cross-entropy
    self_distillation: SelfDistillationConfig = field(default_factory=SelfDistillationConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    locca: LoccaConfig = field(default_factory=LoccaConfig)


@dataclass
class SourceConfig:
    name: str = "default"
    shards: str = "???"  # brace pattern(s), several joined with '::'
    weight: float = 1.0  # relative share of the mixed stream
    epochs: int | None = None  # passes over this source's shards (upsample/cap); None: data.epochs
    max_samples: int | None = None  # cap on the samples this source gives in the whole run, over all ranks
    # A file of sample keys, one a line (`contrastive-data filter --keep-list`): only these samples are read, the
    # shards stay as they are. Needs data.resampled=true (epoch plans count whole shards).
    keep_list: str | None = None


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 256  # global, over all ranks
    num_workers: int = 2  # per rank
    shuffle_buffer: int = 2000
    resampled: bool = True  # draw shards with replacement (infinite stream) instead of epoch passes
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    horizontal_flip: bool = False
    # stop when more than this fraction of samples is bad, or of a worker's shards in an epoch is lost
    max_skip_fraction: float = 0.1
    read_attempts: int = 5  # tries per read of a remote shard (s3://, gs://, http(s)://), the first included
    retry_wait_s: float = 0.5  # before the second try of a remote read; doubled before each further one (max 30 s)
    epochs: int | None = None  # a finite run: passes over every source; None: loop forever (trainer.max_steps)
    min_image_size: int = 8  # pixels; a smaller side is a bad sample (wrong_image_size)
    # Sort each window of `bucket_batches` local batches by caption token count and pad every batch only to its
    # own longest caption (two-tower models with causal text towers: their features do not change)
    length_bucketing: bool = False
    bucket_batches: int = 8
    # Extra augmented views per sample for self-distillation (the plain view still feeds the other losses):
    global_views: int = 0
    global_view_size: int | None = None  # pixels; null: the model's image size
    global_view_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_views: int = 0
    local_view_size: int = 14
    local_view_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    # NaFlex (a model.vision.timm_model_name naflexvit_* tower): the sequence lengths (patches per image) a training
    # step draws from, by (seed, step), with these weights (empty: equal). Empty: fixed-resolution training.
    naflex_seq_lens: list[int] = field(default_factory=list)
    naflex_seq_len_weights: list[float] = field(default_factory=list)
    # Where training JPEGs are decoded: cpu (in the loader workers) or cuda (the workers send the JPEG bytes and the
    # crop boxes they drew; the trainer decodes, crops and resizes the batch on its GPU: transforms.decode_on_device)
    decode_device: str = "cpu"


@dataclass
class LayerDecayConfig:
    # Per tower, a decay in (0, 1] or null (off): with L blocks, block i trains at lr * decay**(L - i), the
    # embeddings at lr * decay**(L + 1), what follows the last block at lr (BEiT's layer-wise lr decay).
    image: float | None = None
    text: float | None = None


@dataclass
class OptimConfig:
    optimizer: str = "torch.optim.AdamW"  # import path; the kwargs below are passed to it
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    # auto: fused when the optimiser class takes `fused` (torch's AdamW, Adam, SGD: one kernel per step, ~5x
    # faster than the per-tensor loop on CPU), else the class's own default | fused | foreach | for_loop
    implementation: str = "auto"
    extra_kwargs: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | constant, after warmup
    min_lr_ratio: float = 0.0
    grad_clip_norm: float | None = 1.0
    # Parameter-name prefix -> lr multiplier, e.g. {"clip.visual.": 0.1} for a pretrained image tower; the longest
    # matching prefix wins, the rest train at lr.
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    # Multiplies the prefix multipliers above; the temperature and bias are in neither tower.
    layer_decay: LayerDecayConfig = field(default_factory=LayerDecayConfig)


@dataclass
class EmaConfig:
    decay: float | None = None  # null: no EMA weights; e.g. 0.9999 (contrastive.models.ema)
    warmup: bool = True  # decay min(decay, (1 + n) / (10 + n)) after n updates


@dataclass
class StageConfig:
    """Training steps before `until` x trainer.max_steps (after the previous stage's) use these input sizes;
    null keeps the model's own. Steps after the last stage use the model's own sizes."""

    until: float = 1.0
    image_size: int | None = None  # pixels, a multiple of the patch size
    context_length: int | None = None  # tokens, at most the model's context length


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    log_every: int = 10
    checkpoint_every: int = 200
    keep_last_checkpoints: int = 2
    keep_every_steps: int | None = None  # also keep every checkpoint whose step is a multiple of this
    max_nonfinite_steps: int = 5  # consecutive NaN/Inf steps (skipped) before the run stops
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    # CPU threads; None: the cores divided among local ranks, less one per data worker (at least one)
    threads_per_process: int | None = None
    progress_bar: bool = True
    deterministic: bool = False
    # Micro-batches per optimiser step; contrastive losses see every micro-batch's negatives (feature cache).
    accumulation_steps: int = 1
    # On CPU, keep freed memory for the next step instead of returning it to the kernel (contrastive.train.host_memory)
    reuse_freed_host_memory: bool = True
    peak_flops_per_device: float | None = None  # FLOP/s of one device at the run's precision; enables the mfu metric
    compile: bool = False  # torch.compile each transformer block (slow first steps; worth it on GPU)
    # auto (dcp under dist.strategy=fsdp, else single) | single (one torch.save file by rank 0) | dcp (sharded,
    # each rank writes its own shards in the background; contrastive.checkpoint_io)
    checkpoint_format: str = "auto"
    ema: EmaConfig = field(default_factory=EmaConfig)
    stages: list[StageConfig] = field(default_factory=list)  # lower resolution / shorter texts early (CLIPA, PE)


@dataclass
class TowerLockConfig:
    locked: bool = False  # freeze the tower (LiT locks the image tower)
    unlocked_blocks: int = 0  # keep the last n blocks and the head after them (final norm, projection) trainable
    unlocked_norms: bool = False  # keep every norm layer of the tower trainable
    checkpoint: str | None = None  # a local checkpoint of ours to load this tower's weights from


@dataclass
class LockConfig:
    image: TowerLockConfig = field(default_factory=TowerLockConfig)
    text: TowerLockConfig = field(default_factory=TowerLockConfig)


@dataclass
class DistConfig:
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # auto | gloo | nccl
    timeout_minutes: float = 30.0
    strategy: str = "ddp"  # ddp (replicated weights) | fsdp (FSDP2, weights/grads/optimiser sharded per block)
    activation_checkpointing: bool = False  # recompute each transformer block's activations in backward


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "contrastive"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ZeroShotDatasetConfig:
    name: str = "???"
    root: str = "???"  # clip_benchmark wds layout: ROOT/{split}/*.tar, classnames.txt, templates file
    split: str = "test"


@dataclass
class RetrievalDatasetConfig:
    name: str = "???"
    root: str = "???"  # paired image-text shards ROOT/{split}/*.tar; .txt holds one caption per line
    split: str = "test"


@dataclass
class EvalConfig:
    zeroshot: list[ZeroShotDatasetConfig] = field(default_factory=list)
    retrieval: list[RetrievalDatasetConfig] = field(default_factory=list)
    every_steps: int = 0  # 0: only at the end of training
    at_end: bool = True
    batch_size: int = 512


@dataclass
class TrainConfig:
    name: str = "default"
    run_dir: str = "runs/${name}"
    seed: int = 0
    resume: str | None = None  # None | latest | path to a checkpoint file or sharded checkpoint directory
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    lock: LockConfig = field(default_factory=LockConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_known_keys(values: dict[str, Any], schema: type, section: str) -> None:
    """A free-form config section (`model.vision`, `model.decoder`) may hold only the fields of its dataclass."""
    known = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{section} has unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def _require_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    require(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}")


def _check_naflex(cfg: TrainConfig) -> None:
    data = cfg.data
    require(all(length > 0 for length in data.naflex_seq_lens),
            f"data.naflex_seq_lens must be positive patch counts, got {list(data.naflex_seq_lens)}")
    require(not data.naflex_seq_len_weights or (len(data.naflex_seq_len_weights) == len(data.naflex_seq_lens)
                                                and all(w > 0 for w in data.naflex_seq_len_weights)),
            "data.naflex_seq_len_weights must be empty or one positive weight per data.naflex_seq_lens entry")
    tower = str(cfg.model.vision.get("timm_model_name") or "")
    require(cfg.model.arch in ("clip", "cappa", "coca") and tower.startswith("naflexvit_"),
            f"data.naflex_seq_lens needs model.arch=clip, cappa or coca with a timm naflexvit_* image tower "
            f"(model.vision.timm_model_name), got arch {cfg.model.arch!r} and tower {tower or None!r}")
    require(not (data.global_views or data.local_views or data.length_bucketing or cfg.trainer.stages),
            "data.naflex_seq_lens does not combine with data.global_views/local_views, data.length_bucketing or "
            "trainer.stages: the sequence length is drawn per step instead")


def validate(cfg: TrainConfig, world_size: int = 1, *, model_archs: Collection[str],
             loss_names: Collection[str]) -> None:
    """Check what the schema's types cannot; raise ConfigError naming the offending key.

    `model_archs`, `loss_names`: the registered names (contrastive.models.list_models, contrastive.losses.list_losses).
    """
    _require_choice(cfg.model.arch, "model.arch", tuple(model_archs))
    _require_choice(cfg.loss.name, "loss.name", tuple(loss_names))
    require(cfg.model.max_logit_scale > 0, "model.max_logit_scale must be positive")
    require(len(cfg.model.image_mean) == 3 and len(cfg.model.image_std) == 3,
            "model.image_mean and model.image_std need three values (RGB)")
    data = cfg.data
    require(len(data.sources) > 0, "data.sources is empty: give at least one source with shards")
    for index, source in enumerate(data.sources):
        require(source.weight > 0, f"data.sources[{index}].weight must be positive, got {source.weight}")
        require(source.epochs is None or source.epochs > 0, f"data.sources[{index}].epochs must be positive")
        require(source.max_samples is None or source.max_samples > 0,
                f"data.sources[{index}].max_samples must be positive")
    require(len({s.name for s in data.sources}) == len(data.sources), "data.sources names must be distinct")
    require(data.epochs is None or data.epochs > 0, f"data.epochs must be positive or null, got {data.epochs}")
    require(data.min_image_size > 0, f"data.min_image_size must be positive, got {data.min_image_size}")
    _require_choice(data.decode_device, "data.decode_device", ("cpu", "cuda"))
    require(data.batch_size > 0, f"data.batch_size must be positive, got {data.batch_size}")
    require(data.batch_size % world_size == 0,
            f"data.batch_size={data.batch_size} is not divisible by the world size {world_size}")
    require(data.num_workers >= 0, f"data.num_workers must be >= 0, got {data.num_workers}")
    require(data.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {data.shuffle_buffer}")
    require(len(data.crop_scale) == 2 and 0 < data.crop_scale[0] <= data.crop_scale[1] <= 1,
            f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {list(data.crop_scale)}")
    for kind in ("global", "local"):
        scale = getattr(data, f"{kind}_view_scale")
        require(getattr(data, f"{kind}_views") >= 0, f"data.{kind}_views must be >= 0")
        require(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
                f"data.{kind}_view_scale must be [low, high] with 0 < low <= high <= 1, got {list(scale)}")
    distill = cfg.loss.self_distillation
    if distill.enabled:
        require(data.global_views > 0 and data.local_views > 0, "loss.self_distillation.enabled needs "
                "data.global_views and data.local_views above 0 (the teacher's and the local student's views)")
        # DDP needs every trainable parameter in every backward (the heads take none before the switch), and its
        # search for unused ones does not look inside ModelOutput; FSDP2 reduces what has a gradient.
        require(world_size == 1 or cfg.dist.strategy == "fsdp",
                "loss.self_distillation on several ranks needs dist.strategy=fsdp")
        require(0 <= distill.start < 1, f"loss.self_distillation.start must be in [0, 1), got {distill.start}")
        require(0 < distill.mask_ratio < 1, "loss.self_distillation.mask_ratio must be in (0, 1)")
        require(distill.teacher_temp > 0 and distill.student_temp > 0, "self-distillation temperatures must be > 0")
        require(0 <= distill.centre_momentum < 1 and 0 <= distill.teacher_momentum <= 1,
                "loss.self_distillation momenta must be in [0, 1)")
    _validate_distillation(cfg)
    if cfg.loss.name == "siglip_locca":
        # Boxes move with the crop only (contrastive.data.boxes): no flips, no extra views, no reordered windows.
        require(not data.horizontal_flip, "loss=siglip_locca needs data.horizontal_flip=false: phrases may say "
                "left or right, so flips are off with boxes")
        require(not (data.global_views or data.local_views or data.length_bucketing), "loss=siglip_locca takes "
                "no data.global_views, data.local_views or data.length_bucketing")
    require(0 <= data.max_skip_fraction <= 1, "data.max_skip_fraction must be within [0, 1]")
    require(data.read_attempts >= 1, f"data.read_attempts must be at least 1, got {data.read_attempts}")
    require(data.retry_wait_s >= 0, f"data.retry_wait_s must be >= 0, got {data.retry_wait_s}")
    optim = cfg.optim
    require(optim.lr > 0, f"optim.lr must be positive, got {optim.lr}")
    require(optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {optim.weight_decay}")
    require(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
            f"optim.betas must be two values in [0, 1), got {list(optim.betas)}")
    require(optim.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {optim.warmup_steps}")
    _require_choice(optim.schedule, "optim.schedule", ("cosine", "linear", "constant"))
    require(0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio must be within [0, 1]")
    _require_choice(optim.implementation, "optim.implementation", ("auto", "fused", "foreach", "for_loop"))
    require(optim.grad_clip_norm is None or optim.grad_clip_norm > 0, "optim.grad_clip_norm must be positive or null")
    for prefix, multiplier in optim.lr_multipliers.items():
        require(multiplier > 0, f"optim.lr_multipliers[{prefix!r}] must be positive (lock.* freezes), got {multiplier}")
    for tower in ("image", "text"):
        decay = getattr(optim.layer_decay, tower)
        require(decay is None or 0 < decay <= 1, f"optim.layer_decay.{tower} must be in (0, 1] or null, got {decay}")
    trainer = cfg.trainer
    require(trainer.max_steps > 0, f"trainer.max_steps must be positive, got {trainer.max_steps}")
    require(trainer.log_every > 0, f"trainer.log_every must be positive, got {trainer.log_every}")
    require(trainer.checkpoint_every > 0, f"trainer.checkpoint_every must be positive, got {trainer.checkpoint_every}")
    require(trainer.keep_last_checkpoints > 0, "trainer.keep_last_checkpoints must be positive")
    require(trainer.keep_every_steps is None or trainer.keep_every_steps > 0,
            "trainer.keep_every_steps must be positive or null")
    require(trainer.max_nonfinite_steps > 0, "trainer.max_nonfinite_steps must be positive")
    _require_choice(trainer.precision, "trainer.precision", ("auto", "fp32", "bf16"))
    _require_choice(trainer.checkpoint_format, "trainer.checkpoint_format", ("auto", "single", "dcp"))
    require(trainer.ema.decay is None or 0 < trainer.ema.decay < 1,
            f"trainer.ema.decay must be within (0, 1) or null, got {trainer.ema.decay}")
    require(trainer.accumulation_steps > 0,
            f"trainer.accumulation_steps must be positive, got {trainer.accumulation_steps}")
    require(data.batch_size % (world_size * trainer.accumulation_steps) == 0,
            f"data.batch_size={data.batch_size} is not divisible by world size {world_size} x "
            f"trainer.accumulation_steps={trainer.accumulation_steps}")
    for index, stage in enumerate(trainer.stages):
        previous = trainer.stages[index - 1].until if index else 0.0
        require(previous < stage.until <= 1, f"trainer.stages[{index}].until must be in ({previous}, 1] (increasing "
                f"fractions of trainer.max_steps), got {stage.until}")
    require(cfg.model.arch == "clip" or not (trainer.stages or data.length_bucketing),
            f"trainer.stages and data.length_bucketing need model.arch=clip, got {cfg.model.arch!r}")
    require(data.bucket_batches > 0, f"data.bucket_batches must be positive, got {data.bucket_batches}")
    require(not (data.global_views or data.local_views) or not (trainer.stages or data.length_bucketing),
            "data.global_views/local_views (self-distillation) do not combine with trainer.stages or "
            "data.length_bucketing yet: the extra views are neither resized per stage nor regrouped by caption length")
    if data.naflex_seq_lens:
        _check_naflex(cfg)
    require(trainer.peak_flops_per_device is None or trainer.peak_flops_per_device > 0,
            "trainer.peak_flops_per_device must be positive or null")
    for tower in ("image", "text"):
        require(getattr(cfg.lock, tower).unlocked_blocks >= 0, f"lock.{tower}.unlocked_blocks must be >= 0")
    _require_choice(cfg.dist.device, "dist.device", ("auto", "cpu", "cuda"))
    _require_choice(cfg.dist.backend, "dist.backend", ("auto", "gloo", "nccl"))
    require(not (cfg.dist.backend == "nccl" and cfg.dist.device == "cpu"),
            "dist.backend=nccl takes only CUDA tensors: use dist.device=cuda (or auto on a GPU node), "
            "or dist.backend=gloo")
    _require_choice(cfg.dist.strategy, "dist.strategy", ("ddp", "fsdp"))
    _require_choice(cfg.logger.wandb.mode, "logger.wandb.mode", ("offline", "online", "disabled"))
    require(cfg.eval.every_steps >= 0, "eval.every_steps must be >= 0")
    require(cfg.resume in (None, "latest") or cfg.resume.endswith(".pt")
            or re.fullmatch(r"step_\d+", Path(cfg.resume.rstrip("/")).name) is not None,
            f"resume must be null, 'latest', a checkpoint .pt file or a sharded checkpoint directory step_N, "
            f"got {cfg.resume!r}")


def _validate_distillation(cfg: TrainConfig) -> None:
    distill = cfg.loss.distillation
    weights = {name: getattr(distill, f"{name}_weight") for name in ("contrastive", "sigmoid", "feature", "patch")}
    for name, weight in weights.items():
        require(weight >= 0, f"loss.distillation.{name}_weight must be >= 0, got {weight}")
    _require_choice(distill.precision, "loss.distillation.precision", ("auto", "fp32", "bf16"))
    if not distill.teachers:
        require(not any(weights.values()), "loss.distillation has term weights but no teachers: add "
                "loss.distillation.teachers=[{name: ..., path: ...}]")
        return
    require(any(weights.values()), "loss.distillation.teachers is set but every loss.distillation.*_weight is 0")
    names = [teacher.name for teacher in distill.teachers]
    require(len(set(names)) == len(names), f"loss.distillation.teachers names must be distinct, got {names}")
    for index, teacher in enumerate(distill.teachers):
        require(teacher.weight > 0, f"loss.distillation.teachers[{index}].weight must be positive")
    require(cfg.model.arch == "clip", f"loss.distillation needs a two-tower student (model.arch=clip), "
            f"got {cfg.model.arch!r}")
    require(not (cfg.data.length_bucketing or cfg.data.global_views or cfg.data.local_views),
            "loss.distillation does not combine with data.length_bucketing or data.global_views/local_views yet: "
            "their batches carry no teacher view")
    require(not cfg.data.naflex_seq_lens, "loss.distillation does not combine with data.naflex_seq_lens yet: NaFlex "
            "batches carry patches, not the crops a teacher view is cut from")
    require(not distill.reinforced or distill.patch_weight == 0, "loss.distillation.patch_weight needs online "
            "teachers: a reinforced data set stores pooled embeddings only")
    require(not (distill.feature_weight or distill.patch_weight) or cfg.trainer.accumulation_steps == 1,
            "loss.distillation.feature_weight/patch_weight need trainer.accumulation_steps=1 (the adaptor heads' "
            "outputs cannot be cached across micro-batches)")
