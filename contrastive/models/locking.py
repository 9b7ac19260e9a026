"""Locked towers (LiT, Zhai et al. 2022): load a tower from a local checkpoint and freeze it, all or in part.

A tower is a set of parameter names of the model: the image tower is everything under `model.visual`, the text
tower is open_clip's text parts of a two-tower model. Its blocks are its longest block list (open_clip's
`resblocks`, timm's `blocks`); its head is the final norm, pooler and projection after them. The same layout
gives optim.layer_decay its layers (`tower_layers`). Frozen parameters have
`requires_grad=False`, so data parallelism and the optimiser (contrastive.train.optim) leave them out. Apply
before wrapping the model for data parallelism and before building the optimiser.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from contrastive.checkpoint_io import load_checkpoint
from contrastive.config import LockConfig, TowerLockConfig
from contrastive.errors import ConfigError, InputError

log = logging.getLogger(__name__)

# open_clip CLIP keeps its text tower at the top level next to `visual`; CustomTextCLIP keeps it under `text`.
CLIP_TEXT_PARTS = ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection", "text")
# Module names after the last block: final norms, poolers, projections.
HEAD_PARTS = ("ln_post", "proj", "ln_final", "text_projection", "norm", "fc_norm", "head", "attn_pool",
              "attn_pool_contrastive", "pooler")
# Module names before the first block (open_clip's, timm's, Hugging Face's), which may hold a `proj` or `norm`.
EMBEDDING_PARTS = ("conv1", "patch_embed", "token_embedding", "embeddings")


def tower_root(model: nn.Module, tower: str) -> tuple[str, nn.Module]:
    """(name prefix, module) under which the tower's parameters live."""
    if tower == "image":
        for name, module in model.named_modules():
            if module is getattr(model, "visual", None):
                return f"{name}.", module
        raise ConfigError(f"{type(model).__name__} has no image tower (model.visual) to lock or load")
    clip = getattr(model, "clip", None)
    if tower == "text" and clip is not None and hasattr(clip, "encode_text"):
        return "clip.", clip
    raise ConfigError(f"{type(model).__name__} has no text tower to lock or load (lock.text fits model.arch=clip)")


def tower_parameter_names(model: nn.Module, tower: str) -> list[str]:
    prefix, root = tower_root(model, tower)
    names = [prefix + name for name, _ in root.named_parameters()]
    if tower == "text":  # the two-tower root also holds the image tower and the temperature
        names = [name for name in names if name.removeprefix(prefix).split(".")[0] in CLIP_TEXT_PARTS]
    return names


def _is_block_list(module: nn.Module) -> bool:
    """open_clip's and Hugging Face's blocks sit in a ModuleList, timm's in a Sequential of `Block`s (possibly
    wrapped for activation checkpointing, or by FSDP as `FSDPBlock`)."""
    if isinstance(module, nn.ModuleList):
        return True
    return isinstance(module, nn.Sequential) and len(module) > 0 and all(
        type(getattr(child, "_checkpoint_wrapped_module", child)).__name__.endswith("Block") for child in module)


def tower_blocks(model: nn.Module, tower: str) -> tuple[str, nn.ModuleList]:
    """(name prefix, module) of the tower's longest block list. Only lists inside the tower count: the text
    tower's root (the two-tower model) also holds the image tower's blocks."""
    prefix, root = tower_root(model, tower)
    names = set(tower_parameter_names(model, tower))
    lists = [(name, module) for name, module in root.named_modules() if _is_block_list(module)
             and all(f"{prefix}{name}.{n}" in names for n, _ in module.named_parameters())]
    if not lists:
        raise ConfigError(f"no block list found in the {tower} tower under {prefix!r}")
    name, blocks = max(lists, key=lambda item: len(item[1]))
    return f"{prefix}{name}.", blocks


def _is_head(name: str, prefix: str) -> bool:
    """After the last block; an embedding's own norm or projection (timm's `patch_embed.proj`) is not."""
    parts = set(name.removeprefix(prefix).split("."))
    return bool(parts & set(HEAD_PARTS)) and not parts & set(EMBEDDING_PARTS)


def tower_layers(model: nn.Module, tower: str) -> tuple[int, dict[str, int]]:
    """(L, parameter name -> layer) for the tower's L blocks: the embeddings (patch, token and position embeddings,
    class token, pre-norm) are layer 0, block i is layer i + 1, the head after the last block is layer L + 1."""
    prefix, _ = tower_root(model, tower)
    blocks_prefix, blocks = tower_blocks(model, tower)
    layers = {}
    for name in tower_parameter_names(model, tower):
        if name.startswith(blocks_prefix):
            layers[name] = int(name.removeprefix(blocks_prefix).split(".")[0]) + 1
        else:
            layers[name] = len(blocks) + 1 if _is_head(name, prefix) else 0
    return len(blocks), layers


def trainable_names(model: nn.Module, tower: str, cfg: TowerLockConfig) -> set[str]:
    """The tower parameters that stay trainable under `cfg`: the last blocks, the head, the norms."""
    prefix, root = tower_root(model, tower)
    names = set(tower_parameter_names(model, tower))
    keep: set[str] = set()
    if cfg.unlocked_blocks:
        blocks_prefix, blocks = tower_blocks(model, tower)
        if cfg.unlocked_blocks > len(blocks):
            raise ConfigError(f"lock.{tower}.unlocked_blocks={cfg.unlocked_blocks} "
                              f"but the tower has {len(blocks)} blocks")
        for index in range(len(blocks) - cfg.unlocked_blocks, len(blocks)):
            keep |= {f"{blocks_prefix}{index}.{n}" for n, _ in blocks[index].named_parameters()}
        keep |= {name for name in names if not name.startswith(blocks_prefix) and _is_head(name, prefix)}
    if cfg.unlocked_norms:
        for module_name, module in root.named_modules():
            if "norm" in type(module).__name__.lower():
                keep |= {f"{prefix}{module_name}.{n}" for n, _ in module.named_parameters(recurse=False)}
    return keep & names


def load_tower(model: nn.Module, tower: str, path: str) -> None:
    """Copy one tower's weights from a checkpoint of ours; a different architecture is named, not loaded."""
    checkpoint = load_checkpoint(path)
    state = checkpoint["model"]
    expected = model.state_dict()
    names = tower_parameter_names(model, tower)
    missing = [name for name in names if name not in state]
    mismatched = [f"{name} {tuple(state[name].shape)} vs {tuple(expected[name].shape)}"
                  for name in names if name in state and state[name].shape != expected[name].shape]
    if missing or mismatched:
        raise InputError(f"lock.{tower}.checkpoint={path} does not match this model's {tower} tower: "
                         f"{len(missing)} missing and {len(mismatched)} mismatched tensors "
                         f"(e.g. {(missing + mismatched)[:3]}); its model config: {checkpoint['config'].get('model')}")
    with torch.no_grad():
        parameters = dict(model.named_parameters())
        for name in names:
            parameters[name].copy_(state[name])
    log.info("loaded the %s tower (%d tensors) from %s", tower, len(names), path)


def apply_locks(model: nn.Module, cfg: LockConfig) -> None:
    for tower in ("image", "text"):
        tower_cfg: TowerLockConfig = getattr(cfg, tower)
        if tower_cfg.checkpoint:
            load_tower(model, tower, tower_cfg.checkpoint)
        if not tower_cfg.locked:
            if tower_cfg.unlocked_blocks or tower_cfg.unlocked_norms:
                raise ConfigError(f"lock.{tower}.unlocked_blocks/unlocked_norms need lock.{tower}.locked=true")
            continue
        keep = trainable_names(model, tower, tower_cfg)
        parameters = dict(model.named_parameters())
        frozen = [name for name in tower_parameter_names(model, tower) if name not in keep]
        for name in frozen:
            parameters[name].requires_grad_(False)
        log.info("locked the %s tower: %d tensors frozen, %d trainable", tower, len(frozen), len(keep))
