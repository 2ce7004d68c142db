"""Activation magnitude: the mean absolute activation of each unit (Minitron's importance)."""

from __future__ import annotations

import torch

from .base import ForwardAttributionMetric, _with_shared_doc

__all__ = ["ActivationMagnitudeAttributionMetric"]


@_with_shared_doc
class ActivationMagnitudeAttributionMetric(ForwardAttributionMetric):
    """Per example, the mean of ``|z|`` of each unit over its positions (tokens, pixels).

    For a ``Linear`` on a sequence ``(N, T, features)`` the units are the features and the mean
    runs over the ``T`` tokens; for a convolution over the spatial positions. Scoring a module
    whose output is an MLP's hidden neurons, a head's output or the residual stream gives the
    per-neuron, per-head and per-hidden-channel importance of Minitron (a head group's score is
    the aggregate of its positions, see `pruneplan.loading.score_groups`). One forward pass per
    batch, no backward; no criterion is used.

    Reference: Muralidharan et al., "Compact Language Models via Pruning and Knowledge
    Distillation" (Minitron), NeurIPS 2024.
    """

    def _unit_scores(self, z: torch.Tensor) -> torch.Tensor:
        a = z.abs().to(torch.float64)
        return a.flatten(2).mean(-1) if a.dim() > 2 else a
