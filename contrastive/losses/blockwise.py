"""Contrastive logits scored a block of columns at a time, never materialised whole.

Both functions see `queries` (B, D) against `keys` (M, D) with logits = scale * queries @ keys.T (+ bias). The
forward pass keeps only per-row reductions; the backward pass recomputes each (B, block) logit block and turns
it straight into gradients, so memory is O(B x (D + block)) however large M is. The price is one extra matmul
per block (the recomputation); every other pass over a block is fused into a matmul or done in place, and
per-row or per-scalar factors are applied to (B, D) tensors instead of (B, block) ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _column_blocks(num_columns: int, block_size: int):
    for start in range(0, num_columns, block_size):
        yield start, min(start + block_size, num_columns)


class _BlockSigmoidLoss(torch.autograd.Function):
    """Sum over all (B, M) pairs of -log sigmoid(z * logit); z = +1 on the diagonal if `diagonal_positive`, else -1.

    -log sigmoid(z x) is softplus(x) for negatives and softplus(-x) for positives, so each block is computed as
    if every pair were negative and then its few diagonal entries are replaced.
    """

    @staticmethod
    def forward(ctx, queries, keys, scale, bias, diagonal_positive: bool, block_size: int):
        with torch.autocast(queries.device.type, enabled=False):
            scaled_queries = queries * scale
            total = queries.new_zeros(())
            for start, stop in _column_blocks(keys.shape[0], block_size):
                logits = torch.addmm(bias, scaled_queries, keys[start:stop].T)  # (B, block)
                losses = F.softplus(logits)
                if diagonal_positive:  # entries (start + j, j): column start + j matches row start + j
                    losses.diagonal(-start).copy_(F.softplus(-logits.diagonal(-start)))
                total += losses.sum()
        ctx.save_for_backward(queries, keys, scale, bias)
        ctx.diagonal_positive, ctx.block_size = diagonal_positive, block_size
        return total

    @staticmethod
    def backward(ctx, grad_total):
        queries, keys, scale, bias = ctx.saved_tensors
        scaled_queries = queries * scale
        grad_logits_keys = torch.zeros_like(queries)  # sum_j dL/dlogit_ij k_j, (B, D)
        grad_keys = torch.empty_like(keys)
        grad_bias = torch.zeros_like(bias)
        for start, stop in _column_blocks(keys.shape[0], ctx.block_size):
            logits = torch.addmm(bias, scaled_queries, keys[start:stop].T)  # (B, block)
            positives = logits.diagonal(-start).clone() if ctx.diagonal_positive else None
            grad_logits = logits.sigmoid_()  # d softplus(x) / dx
            if positives is not None:
                grad_logits.diagonal(-start).copy_(-torch.sigmoid(-positives))  # d softplus(-x) / dx
            grad_bias += grad_logits.sum()
            grad_logits_keys.addmm_(grad_logits, keys[start:stop])
            torch.mm(grad_logits.T, scaled_queries, out=grad_keys[start:stop])
        # dL/dscale = sum_ij dL/dlogit_ij q_i . k_j = sum_i q_i . (sum_j dL/dlogit_ij k_j)
        grad_scale = (queries * grad_logits_keys).sum()
        grad_queries = grad_logits_keys.mul_(scale)
        return (grad_queries.mul_(grad_total), grad_keys.mul_(grad_total), grad_scale * grad_total,
                grad_bias * grad_total, None, None)


def blockwise_sigmoid_loss(queries, keys, scale, bias, diagonal_positive: bool, block_size: int) -> torch.Tensor:
    """Sum of -log sigmoid(z * (scale * q . k + bias)) over every (query, key) pair; scalar."""
    return _BlockSigmoidLoss.apply(queries, keys, scale, bias, diagonal_positive, block_size)


class _BlockLogSumExp(torch.autograd.Function):
    """Per row, log sum_j exp(scale * q . k_j) by an online (running max) log-sum-exp over column blocks."""

    @staticmethod
    def forward(ctx, queries, keys, scale, block_size: int):
        with torch.autocast(queries.device.type, enabled=False):
            scaled_queries = queries * scale
            rows = queries.shape[0]
            running_max = queries.new_full((rows,), -torch.inf)
            running_sum = queries.new_zeros(rows)  # sum of exp(logit - running_max)
            best_column = torch.zeros(rows, dtype=torch.long, device=queries.device)
            for start, stop in _column_blocks(keys.shape[0], block_size):
                logits = torch.mm(scaled_queries, keys[start:stop].T)  # (B, block)
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
        scaled_queries = queries * scale
        # d lse_i / d logit_ij = softmax_ij =: p_ij; the row factor g_i = dL/dlse_i is applied to (B, D) tensors.
        weighted_queries = scaled_queries * grad_log_sum_exp[:, None]
        softmax_keys = torch.zeros_like(queries)  # sum_j p_ij k_j, (B, D)
        grad_keys = torch.empty_like(keys)
        for start, stop in _column_blocks(keys.shape[0], ctx.block_size):
            # p = exp(logit - lse), the subtraction fused into the matmul.
            softmax = torch.addmm(-log_sum_exp[:, None], scaled_queries, keys[start:stop].T).exp_()  # (B, block)
            softmax_keys.addmm_(softmax, keys[start:stop])
            torch.mm(softmax.T, weighted_queries, out=grad_keys[start:stop])
        row_grads = softmax_keys.mul_(grad_log_sum_exp[:, None])  # sum_j dL/dlogit_ij k_j
        grad_scale = (queries * row_grads).sum()
        return row_grads.mul_(scale), grad_keys, grad_scale, None


def blockwise_log_sum_exp(queries, keys, scale, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (log-sum-exp of each query's logits over all keys (B,), index of each query's best key (B,))."""
    return _BlockLogSumExp.apply(queries, keys, scale, block_size)
