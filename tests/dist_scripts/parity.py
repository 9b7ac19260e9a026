"""What the torchrun parity scripts share: a model's gradients gathered whole under any wrapping, and the check of
one rank's view (the rank-mean loss and every gradient) against the one-process run on the global batch."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def full_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> whole gradient: FSDP2's DTensor shards gathered, and the names DDP (`module.`) and
    activation checkpointing (`_checkpoint_wrapped_module.`) add taken out, so they match the unwrapped model's."""
    grads = {}
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        plain = name.removeprefix("module.").replace("_checkpoint_wrapped_module.", "")
        grads[plain] = grad.full_tensor() if isinstance(grad, DTensor) else grad.clone()
    return grads


def parity_failures(loss: torch.Tensor, grads: dict[str, torch.Tensor], expected_loss: torch.Tensor,
                    expected: dict[str, torch.Tensor], rtol: float, atol: float) -> list[str]:
    """Every way the distributed loss and gradients differ from the one-process ones (empty: they agree)."""
    failures = [] if grads.keys() == expected.keys() else ["parameter names differ"]
    failures += [f"{name}: max abs diff {(grads[name] - grad).abs().max().item():.2e}"
                 for name, grad in expected.items()
                 if name in grads and not torch.allclose(grads[name], grad, rtol=rtol, atol=atol)]
    if not torch.allclose(loss, expected_loss, rtol=1e-5):
        failures.append(f"loss {loss.item()} vs {expected_loss.item()}")
    return failures


def report(label: str, loss: torch.Tensor, expected_loss: torch.Tensor, gradients: int,
           failures: list[str]) -> None:
    print(f"{label}: loss {loss.item():.6f} (one process {expected_loss.item():.6f}), {gradients} gradients: "
          + ("OK" if not failures else "FAIL " + "; ".join(failures[:5])), flush=True)
