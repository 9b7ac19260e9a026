"""Contrastive logits scored a block of columns at a time, never materialised whole.

Both functions see `queries` (B, D) against `keys` (M, D) with logits = scale * queries @ keys.T (+ bias). The
forward pass keeps only per-row reductions; the backward pass recomputes each (B, block) logit block and turns
it straight into gradients, so memory is O(B x (D + block)) however large M is. Each costs one extra matmul per
block in backward (the recomputation) against a materialised loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _column_blocks(num_columns: int, block_size: int):
    for start in range(0, num_columns, block_size):
        yield start, min(start + block_size, num_columns)


class _BlockSigmoidLoss(torch.autograd.Function):
    """Sum over all (B, M) pairs of -log sigmoid(z * logit); z = +1 on the diagonal if `diagonal_positive`, else -1."""

    @staticmethod
    def forward(ctx, queries, keys, scale, bias, diagonal_positive: bool, block_size: int):
        with torch.autocast(queries.device.type, enabled=False):
            total = queries.new_zeros(())
            for start, stop in _column_blocks(keys.shape[0], block_size):
                logits = torch.mm(queries, keys[start:stop].T).mul_(scale).add_(bias)  # (B, block)
                signs = _signs(logits, start, diagonal_positive)
                total += F.softplus(-signs * logits).sum()  # -log sigmoid(x) = softplus(-x)
        ctx.save_for_backward(queries, keys, scale, bias)
        ctx.diagonal_positive, ctx.block_size = diagonal_positive, block_size
        return total

    @staticmethod
    def backward(ctx, grad_total):
        queries, keys, scale, bias = ctx.saved_tensors
        grad_queries, grad_keys = torch.zeros_like(queries), torch.empty_like(keys)
        grad_scale, grad_bias = torch.zeros_like(scale), torch.zeros_like(bias)
        for start, stop in _column_blocks(keys.shape[0], ctx.block_size):
            dots = queries @ keys[start:stop].T  # (B, block)
            logits = dots * scale + bias
            signs = _signs(logits, start, ctx.diagonal_positive)
            grad_logits = -signs * torch.sigmoid(-signs * logits) * grad_total  # d softplus(-z x) / dx
            grad_bias += grad_logits.sum()
            grad_scale += (grad_logits * dots).sum()
            grad_queries.addmm_(grad_logits, keys[start:stop])
            torch.mm(grad_logits.T, queries, out=grad_keys[start:stop])
        return grad_queries.mul_(scale), grad_keys.mul_(scale), grad_scale, grad_bias, None, None


def _signs(logits: torch.Tensor, start: int, diagonal_positive: bool) -> torch.Tensor:
    """-1 everywhere, +1 where column start + j is row start + j (a matching pair)."""
    signs = torch.full_like(logits, -1.0)
    if diagonal_positive:
        signs.diagonal(offset=-start).fill_(1.0)
    return signs


def blockwise_sigmoid_loss(queries, keys, scale, bias, diagonal_positive: bool, block_size: int) -> torch.Tensor:
    """Sum of -log sigmoid(z * (scale * q . k + bias)) over every (query, key) pair; scalar."""
    return _BlockSigmoidLoss.apply(queries, keys, scale, bias, diagonal_positive, block_size)


class _BlockLogSumExp(torch.autograd.Function):
    """Per row, log sum_j exp(scale * q . k_j) by an online (running max) log-sum-exp over column blocks."""

    @staticmethod
    def forward(ctx, queries, keys, scale, block_size: int):
        with torch.autocast(queries.device.type, enabled=False):
            rows = queries.shape[0]
            running_max = queries.new_full((rows,), -torch.inf)
            running_sum = queries.new_zeros(rows)  # sum of exp(logit - running_max)
            best_column = torch.zeros(rows, dtype=torch.long, device=queries.device)
            for start, stop in _column_blocks(keys.shape[0], block_size):
                logits = torch.mm(queries, keys[start:stop].T).mul_(scale)  # (B, block)
                block_max, block_argmax = logits.max(dim=1)
                new_max = torch.maximum(running_max, block_max)
                running_sum = running_sum * torch.exp(running_max - new_max)
                running_sum += logits.sub_(new_max[:, None]).exp_().sum(dim=1)
                best_column = torch.where(block_max > running_max, block_argmax + start, best_column)
                running_max = new_max
            log_sum_exp = running_max + running_sum.log()
        ctx.save_for_backward(queries, keys, scale, log_sum_exp)
        ctx.block_size = block_size
        ctx.mark_non_differentiable(best_column)
        return log_sum_exp, best_column

    @staticmethod
    def backward(ctx, grad_log_sum_exp, _grad_best_column):
        queries, keys, scale, log_sum_exp = ctx.saved_tensors
        grad_queries, grad_keys = torch.zeros_like(queries), torch.empty_like(keys)
        grad_scale = torch.zeros_like(scale)
        for start, stop in _column_blocks(keys.shape[0], ctx.block_size):
            dots = queries @ keys[start:stop].T  # (B, block)
            # d lse_i / d logit_ij = softmax_ij, recovered from the saved log-sum-exp.
            grad_logits = torch.exp(dots * scale - log_sum_exp[:, None]).mul_(grad_log_sum_exp[:, None])
            grad_scale += (grad_logits * dots).sum()
            grad_queries.addmm_(grad_logits, keys[start:stop])
            torch.mm(grad_logits.T, queries, out=grad_keys[start:stop])
        return grad_queries.mul_(scale), grad_keys.mul_(scale), grad_scale, None


def blockwise_log_sum_exp(queries, keys, scale, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (log-sum-exp of each query's logits over all keys (B,), index of each query's best key (B,))."""
    return _BlockLogSumExp.apply(queries, keys, scale, block_size)
