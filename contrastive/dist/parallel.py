"""How the model is laid out over ranks: DDP or FSDP2 per transformer block, activation checkpointing, compile.

Single-file checkpoints hold full (unsharded) state dicts keyed by parameter name, for the model and the optimiser
alike, so a checkpoint written under one strategy and world size loads under any other. Gathering and scattering
them are collectives under FSDP: every rank calls `full_state` and `load_full_state`. Sharded checkpoints, which
need neither, are in contrastive.dist.checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX, checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from contrastive.dist.env import DistEnv
from contrastive.errors import ConfigError

STRATEGIES = ("ddp", "fsdp")
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 receives the tensors, on CPU
_SCATTER = StateDictOptions(full_state_dict=True)  # every rank passes the full state; each keeps its shard
_FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)  # only rank 0 passes it
# An optimiser state may lack parameters that never had a gradient (self-distillation's heads before its switch).
_SCATTER_OPTIMIZER = StateDictOptions(full_state_dict=True, strict=False)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules whose class name ends in 'Block', in registration order.

    That names open_clip's (Custom)ResidualAttentionBlock, timm's ViT Block and our caption decoder's
    DecoderBlock: the repeated unit that FSDP shards, activation checkpointing recomputes and compile reuses.
    """
    blocks: list[nn.Module] = []
    inside: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if type(module).__name__.endswith("Block"):
            blocks.append(module)
            inside.add(name + ".")
    return blocks


def _checkpoint_blocks(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """Replace every block by a wrapper that recomputes its activations in backward; returns the wrappers.

    The wrapper adds `_checkpoint_wrapped_module.` to parameter names; `state_dict()` and the full state dicts
    below strip it, so checkpoints keep the plain names.
    """
    parents = {child: (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    wrapped = []
    for block in blocks:
        parent, name = parents[block]
        wrapper = checkpoint_wrapper(block)
        parent.register_module(name, wrapper)
        wrapped.append(wrapper)
    return wrapped


def parallelize(model: nn.Module, env: DistEnv, strategy: str = "ddp", activation_checkpointing: bool = False,
                compile_blocks: bool = False, bf16: bool = False, static_lengths: int = 0) -> nn.Module:
    """Prepare `model` (already on env.device) for training; returns the module to call in the training step.

    The optimiser must be built from `model` afterwards: FSDP turns its parameters into sharded DTensors in place.
    Compile works per block, so identical blocks share one compiled graph and FSDP's hooks stay outside it.
    With `bf16`, FSDP gathers bf16 copies of its fp32 shards and computes in them, and reduces gradients in fp32
    (the trainer then needs no autocast); DDP and a single process leave precision to the trainer's autocast.
    `static_lengths`: how many token counts the blocks will see (NaFlex's data.naflex_seq_lens), 0 for one. Each
    then gets its own static-shape graph, compiled the first time it comes: dynamo's default would compile the
    first length statically, then again with a symbolic length (twice, as the first block's input is a view and
    the others' are not), and the symbolic graphs give inductor less to specialise on.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"dist.strategy={strategy!r} is not one of {', '.join(STRATEGIES)}")
    blocks = transformer_blocks(model)
    if activation_checkpointing:
        blocks = _checkpoint_blocks(model, blocks)
    if compile_blocks:
        if static_lengths:
            # One cache entry per length per block code; past the limit dynamo would silently run eager.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, static_lengths)
        options = {"dynamic": False} if static_lengths else {}
        for block in blocks:
            block.compile(**options)
    if env.world_size == 1:
        return model  # nothing to shard or synchronise
    if strategy == "fsdp":
        # FSDP cannot shard 0-d parameters (the logit scale and bias): they stay whole on every rank, and their
        # gradients are averaged here, as DDP would.
        scalars = {p for p in model.parameters() if p.ndim == 0}

        def average_gradient(parameter: nn.Parameter) -> None:
            parameter.grad.copy_(env.collectives.all_reduce_mean(parameter.grad))

        for parameter in scalars:
            if parameter.requires_grad:
                parameter.register_post_accumulate_grad_hook(average_gradient)
        # Ranks initialised their weights from different seeds; like DDP, start all of them from rank 0's.
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()} if env.rank == 0 else {}
        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        for block in blocks:
            fully_shard(block, ignored_params=scalars, mp_policy=precision)
        # The root: embeddings, projections, final norms; it also casts the images to bf16 on the way in.
        fully_shard(model, ignored_params=scalars, mp_policy=precision)
        set_model_state_dict(model, initial, options=_FROM_RANK0)
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shard_frozen(model: nn.Module, bf16: bool = False, methods: tuple[str, ...] = ()) -> nn.Module:
    """Shard a frozen, inference-only model (a distillation teacher) over the ranks per transformer block with
    FSDP2: each rank keeps 1/world of its weights and gathers a block's just before running it. With `bf16` the
    gathered weights are bf16. Every rank must then run every forward the others run (the gathers are collectives).
    `methods`: the model's entry points besides forward (encode_image, encode_text), which gather its root weights
    as forward does.
    """
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if bf16 else MixedPrecisionPolicy()
    scalars = [p for p in model.parameters() if p.ndim == 0]  # FSDP cannot shard 0-d parameters
    for block in transformer_blocks(model):
        fully_shard(block, ignored_params=set(scalars), mp_policy=precision)
    fully_shard(model, ignored_params=set(scalars), mp_policy=precision)
    for method in methods:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def replicated(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a reduction over sharded tensors (e.g. FSDP's gradient norm): an all-reduce on the
    device, no host sync. Plain tensors come back as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (FSDP's parameters, gradients, optimiser state); plain tensors come
    back as they are."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole_norm(shard: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The 2-norm of the whole tensor whose local part is `shard`, laid out as `like` (e.g. an update computed on
    FSDP's local shards, laid out as its parameter): an all-reduce under FSDP, no host sync; a plain norm else."""
    if isinstance(like, DTensor):
        shard = DTensor.from_local(shard, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                   stride=like.stride())
    return replicated(torch.linalg.vector_norm(shard))


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state, optimiser state), unsharded and on CPU on rank 0; under FSDP other ranks get empty dicts.

    The optimiser state is keyed by parameter name instead of position, which is what lets it move between
    strategies (and parameter orders) unchanged.
    """
    return gather_model_state(model), get_optimizer_state_dict(model, optimizer, options=_GATHER)


def gather_model_state(model: nn.Module) -> dict[str, Any]:
    """The model's full state dict on CPU on rank 0 (empty elsewhere under FSDP), e.g. to evaluate a plain copy."""
    return get_model_state_dict(model, options=_GATHER)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                    optimizer_state: dict[str, Any]) -> None:
    """Load full state dicts (from `full_state`, read by every rank); under FSDP each rank keeps its own shard."""
    set_model_state_dict(model, model_state, options=_SCATTER)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_SCATTER_OPTIMIZER)
    drop_unsaved_optimizer_state(model, optimizer, lambda name: name in optimizer_state["state"])


def drop_unsaved_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                                 saved: Callable[[str], bool]) -> None:
    """Forget the optimiser state of parameters whose state the checkpoint lacks (they never had a gradient).

    torch's state-dict helpers give an empty optimiser a state for every parameter (a step at learning rate 0,
    counting step 1), so such a parameter's first real step would count as its second and bias-correct
    differently from the run that saved the checkpoint."""
    for name, parameter in model.named_parameters():
        if not saved(name.replace(_CHECKPOINT_PREFIX, "")):
            optimizer.state.pop(parameter, None)
