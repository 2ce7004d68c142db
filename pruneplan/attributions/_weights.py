"""The weights of each output unit of a module, as the rows of a matrix (for data-free metrics)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["heads_projection", "unit_rows"]


def heads_projection(module: nn.Module) -> nn.Linear | None:
    """The layer whose input columns an attention module's heads own (their units' weights):
    ``out_proj`` of an ``nn.MultiheadAttention``; ``proj`` of a module with no weight of its own,
    an integer ``num_heads`` and ``qkv`` / ``proj`` Linear children (torchvision's Swin)."""
    if isinstance(module, nn.MultiheadAttention):
        return module.out_proj
    if getattr(module, "weight", None) is None and isinstance(getattr(module, "num_heads", None), int) \
            and isinstance(getattr(module, "qkv", None), nn.Linear) \
            and isinstance(getattr(module, "proj", None), nn.Linear):
        return module.proj
    return None


def _rnn_rows(name: str, module: nn.RNNBase) -> torch.Tensor:
    """``(hidden_size, ...)``: the gate rows of every ``weight_ih`` / ``weight_hh`` (all layers,
    both directions) that each hidden unit owns (rows ``j, H + j, 2H + j, ...``)."""
    h = module.hidden_size
    parts = []
    for pname, p in module.named_parameters(recurse=False):
        if not pname.startswith(("weight_ih_l", "weight_hh_l")) or not isinstance(p, torch.Tensor):
            continue
        if p.dim() != 2 or p.shape[0] % h:
            raise ValueError(f"module {name!r}: {pname} of shape {tuple(p.shape)} is not gate rows "
                             f"of {h} hidden units")
        w = p.detach().to("cpu", torch.float64)
        parts.append(w.reshape(p.shape[0] // h, h, p.shape[1]).transpose(0, 1).reshape(h, -1))
    if not parts:
        raise ValueError(f"module {name!r} ({type(module).__name__}) has no weight_ih / weight_hh tensor")
    return torch.cat(parts, 1)


def unit_rows(name: str, module: nn.Module) -> torch.Tensor:
    """``(units, fan_in)`` float64 CPU matrix: row ``i`` holds every weight of output unit ``i``.

    The output axis of ``weight`` is 0 (``Linear``, convolutions), 1 for transposed
    convolutions (per group when grouped), ``Embedding`` / ``EmbeddingBag`` (the units are the
    embedding features, ``embedding_dim``) and GPT-2's ``Conv1D`` (duck-typed by an integer
    ``nf``; its weight is (in, out)); an attention module's units are the inputs of its output
    projection (`heads_projection`); a recurrent layer's (``nn.RNN`` / ``LSTM`` / ``GRU``)
    units are its hidden units, each owning one row per gate of every ``weight_ih_l*`` and
    ``weight_hh_l*`` (rows ``j``, ``H + j``, ...; all layers and directions).

    Raises:
        ValueError: the module has no ``weight`` tensor (nor is a recurrent layer).
    """
    if isinstance(module, nn.RNNBase):
        return _rnn_rows(name, module)
    weight = getattr(module, "weight", None)
    axis = 0
    proj = heads_projection(module)
    if proj is not None:  # attention heads: columns of the output projection
        weight, axis = proj.weight, 1
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"module {name!r} ({type(module).__name__}) has no weight tensor")
    w = weight.detach().to("cpu", torch.float64)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # (in, out / groups, *k): unit o = group o // (out / groups), column o % (out / groups)
        g = module.groups
        w = w.reshape(g, w.shape[0] // g, *w.shape[1:]).transpose(1, 2)
        return w.reshape(g * w.shape[1], -1)
    if isinstance(module, nn.Embedding | nn.EmbeddingBag) or isinstance(getattr(module, "nf", None), int):
        axis = 1
    if w.dim() < 2:
        return w.reshape(-1, 1)
    w = w.transpose(0, axis)
    return w.reshape(w.shape[0], -1)
