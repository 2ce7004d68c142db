"""Loss functions for attribution with ``reduction="none"`` support: the causal-LM criterion."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_loss"]


def causal_lm_loss(output: Any, labels: torch.Tensor, reduction: str = "mean",
                   ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy of a causal language model, per example with ``reduction="none"``.

    Position ``t`` of the logits predicts token ``t + 1`` of ``labels`` (the shift Hugging Face's
    ``*ForCausalLM`` models apply to ``labels=input_ids``); tokens equal to ``ignore_index`` do
    not count. Use it as the ``criterion`` of any metric, with batches ``(input_ids, input_ids)``.

    Args:
        output: logits ``(N, T, vocab)``, or a model output with a ``logits`` attribute.
        labels: token ids ``(N, T)``.
        reduction: ``"none"``: one loss per example ``(N,)``, the mean over its counted tokens
            (0 for an example with none); ``"mean"``: the mean over every counted token;
            ``"sum"``: their sum.

    Raises:
        ValueError: shapes that do not match, or an unknown reduction.
    """
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError("causal_lm_loss needs logits of shape (N, T, vocab) or an output with .logits")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    pred, target = logits[:, :-1].float(), labels[:, 1:]
    tokens = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                             ignore_index=ignore_index, reduction="none").reshape(target.shape)
    counted = (target != ignore_index).to(tokens.dtype)
    if reduction == "none":
        return tokens.sum(1) / counted.sum(1).clamp(min=1)
    if reduction == "sum":
        return tokens.sum()
    if reduction == "mean":
        return tokens.sum() / counted.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


causal_lm_loss.accepts_model_output = True  # type: ignore[attr-defined]
