"""After slicing: the sizes attention and MLP modules cache, and a Hugging Face ``model.config``.

Implementations cache sizes at construction (``num_heads``, ``head_dim``, ``all_head_size``,
``num_key_value_groups``, GPT-2's ``split_size``, ``Conv1D.nf``, an MLP's
``intermediate_size``...) and some use them in ``forward``. The plan's edits name the attributes
its groups own; the remaining cached sizes are found here by duck typing (attribute and child
names, no import of `transformers`) and recomputed from the pruned weight shapes. An attribute is
only touched when, before pruning, it equals the value it is recomputed from, so an attribute of
the same name that means something else is left alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pruneplan._tied import tied_keys
from pruneplan.errors import ConfigError, PlanMismatchError
from pruneplan.hf_config import HIDDEN_KEYS, config_edits, get_value
from pruneplan.plan import ConfigEdits, PrunePlan

__all__ = ["config_changes", "hf_config_of", "stage_cached_sizes", "stage_model_dims"]

log = logging.getLogger(__name__)

_HEAD_SIZE = ("head_dim", "attention_head_size", "key_value_proj_dim", "dim_per_head", "head_size")
_QUERY = ("q_proj", "query", "q", "q_lin")
_KEY = ("k_proj", "key", "k", "k_lin")
_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads")
_QUERY_WIDTH = ("all_head_size", "inner_dim", "split_size")
_HIDDEN = ("embed_dim", "hidden_size", "d_model", "dim")
_UP = ("up_proj", "gate_proj", "fc1", "c_fc", "lin1", "wi", "wi_0", "dense_h_to_4h")

Shape = Callable[[str], Sequence[int] | None]


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _dims(name: str, child: nn.Module | None, shape: Shape) -> tuple[int, int] | None:
    """(out, in) width of a Linear-like child from the weight shape ``shape`` gives."""
    if child is None:
        return None
    s = shape(f"{name}.weight" if name else "weight")
    if s is None or len(s) != 2:
        return None
    if _int(getattr(child, "nf", None)) is not None:  # GPT-2 Conv1D: weight is (in, out)
        return int(s[1]), int(s[0])
    return int(s[0]), int(s[1])


def stage_cached_sizes(
    model: nn.Module,
    old: Mapping[str, Sequence[int]],
    new: Mapping[str, Sequence[int]],
) -> list[tuple[nn.Module, str, int, str]]:
    """(module, attribute, new value, module name) for every cached size that the slicing changes.

    Args:
        old, new: state-dict key -> shape before and after the plan.

    Raises:
        ConfigError: grouped-query attention would lose the equal number of query heads per
            key/value head (``num_key_value_groups`` not a whole number), or a query projection
            keeps a width that is not whole heads; the message names the module.
    """
    out: list[tuple[nn.Module, str, int, str]] = []

    def dims(prefix: str, child_name: str, which: Mapping[str, Sequence[int]]) -> tuple[int, int] | None:
        full = f"{prefix}.{child_name}" if prefix else child_name
        child = getattr(module, child_name, None)
        if not isinstance(child, nn.Module):
            return None
        return _dims(full, child, lambda k: which.get(k))

    def sync(attr: str, before: int, after: int) -> None:
        current = _int(getattr(module, attr, None))
        if current is not None and current == before and before != after:
            out.append((module, attr, after, name))

    for name, module in model.named_modules():
        # Conv1D (GPT-2): nf is the output width
        if _int(getattr(module, "nf", None)) is not None and isinstance(getattr(module, "weight", None),
                                                                         nn.Parameter):
            key = f"{name}.weight" if name else "weight"
            if key in old and len(old[key]) == 2:
                sync("nf", int(old[key][1]), int(new[key][1]))
        children = dict(module.named_children())
        if not children:
            continue
        q_name = next((c for c in _QUERY if c in children), None)
        fused = q_name is None and "c_attn" in children and "q_attn" not in children
        q_old = dims(name, q_name, old) if q_name else None
        q_new = dims(name, q_name, new) if q_name else None
        if fused:
            a, b = dims(name, "c_attn", old) or (0, 0), dims(name, "c_attn", new) or (0, 0)
            if a[0] % 3 == 0 and b[0] % 3 == 0:
                q_old, q_new = (a[0] // 3, a[1]), (b[0] // 3, b[1])
        if q_old is not None and q_new is not None:
            head = next((_int(getattr(module, h, None)) for h in _HEAD_SIZE
                         if _int(getattr(module, h, None))), None)
            k_name = next((c for c in _KEY if c in children), None)
            k_old = dims(name, k_name, old) if k_name else None
            k_new = dims(name, k_name, new) if k_name else None
            for attr in _QUERY_WIDTH:
                sync(attr, q_old[0], q_new[0])
            for attr in _HIDDEN:
                sync(attr, q_old[1], q_new[1])
            if head and q_old[0] % head == 0:
                if q_new[0] % head:
                    raise ConfigError(
                        f"module {name!r}: the query projection keeps {q_new[0]} of {q_old[0]} "
                        f"outputs, not whole heads of {head}"
                    )
                for attr in _HEADS:
                    sync(attr, q_old[0] // head, q_new[0] // head)
                if k_old is not None and k_new is not None and k_old[0] % head == 0:
                    kv_old, kv_new = k_old[0] // head, k_new[0] // head
                    for attr in _KV_HEADS:
                        sync(attr, kv_old, kv_new)
                    hq_old, hq_new = q_old[0] // head, q_new[0] // head
                    if kv_old and hq_old % kv_old == 0:
                        if kv_new == 0 or hq_new % kv_new:
                            raise ConfigError(
                                f"module {name!r}: grouped-query attention keeps {hq_new} query heads "
                                f"for {kv_new} key/value heads; every key/value head must keep the "
                                "same number of query heads"
                            )
                        sync("num_key_value_groups", hq_old // kv_old, hq_new // kv_new)
        up = next((c for c in _UP if c in children), None)
        if up is not None and q_name is None and not fused:
            u_old, u_new = dims(name, up, old), dims(name, up, new)
            if u_old is not None and u_new is not None:
                sync("intermediate_size", u_old[0], u_new[0])
                sync("hidden_size", u_old[1], u_new[1])
    return out


#: sizes a model caches from its config's hidden size outside attention and MLP modules
_MODEL_DIM = ("model_dim",)


def stage_model_dims(model: nn.Module, config: Any, values: Mapping[str, int]
                     ) -> list[tuple[nn.Module, str, Any, str]]:
    """(module, attribute, new value, module name) for the copies of the config's hidden size
    that modules keep for their forward, so that the pruned model computes what a model built
    from the rewritten config computes: T5's ``model_dim`` (the decoder output is scaled by
    ``model_dim ** -0.5`` before a tied ``lm_head``), and a scaled embedding's constant factor
    ``sqrt(hidden size)`` (Gemma multiplies the embedding by it): a 0-dim buffer of an
    ``nn.Embedding`` that the state dict does not hold and that equals the square root of the
    hidden size before pruning becomes the square root of the new one (same dtype)."""
    key = next((k for k in HIDDEN_KEYS if k in values), None)
    before = _int(getattr(config, key, None)) if key is not None else None
    if before is None:
        return []
    after = values[key]
    out: list[tuple[nn.Module, str, Any, str]] = []
    for name, module in model.named_modules():
        for attr in _MODEL_DIM:
            if _int(getattr(module, attr, None)) == before:
                out.append((module, attr, after, name))
        if isinstance(module, nn.Embedding):
            saved = set(module.state_dict())
            for attr, buf in module.named_buffers(recurse=False):
                if (buf is not None and buf.dim() == 0 and attr not in saved and buf.is_floating_point()
                        and math.isclose(float(buf), before ** 0.5, rel_tol=1e-3)):
                    out.append((module, attr, torch.tensor(after ** 0.5, dtype=buf.dtype,
                                                           device=buf.device), name))
    return out


def hf_config_of(model: nn.Module) -> Any:
    """``model.config`` when it looks like a Hugging Face config (has ``to_dict``), else None."""
    config = getattr(model, "config", None)
    return config if callable(getattr(config, "to_dict", None)) else None


def config_changes(
    model: nn.Module, plan: PrunePlan, shapes: Mapping[str, Sequence[int]]
) -> tuple[Any, dict[str, int], list[str]]:
    """(config, key -> new value, problems) for a Hugging Face model; (None, {}, []) otherwise.

    The plan's recorded ``config`` part is used when present (its ``before`` values must match
    the live config); otherwise the changes are measured from the config and the shapes. Either
    way the grouped-query attention check of `pruneplan.hf_config.config_edits` runs.

    Raises:
        ConfigError: uneven grouped-query attention (naming the layer).
        PlanMismatchError: the config does not hold the values the plan was made for.
    """
    config = hf_config_of(model)
    if config is None:
        return None, {}, []
    fresh = config_edits(config.to_dict(), shapes, plan, tied=tied_keys(model))
    edits: ConfigEdits | None = plan.config if plan.config is not None else fresh
    if edits is None:
        return config, {}, []
    for c in edits.changes:
        current = get_value(config, c.key)
        if _int(current) != c.before or (c.before is None and current is not None):
            raise PlanMismatchError(
                f"model: config.{c.key} is {current!r}, the plan expects {c.before!r} "
                "(was the model already pruned?)"
            )
    return config, edits.values(), edits.problems()
