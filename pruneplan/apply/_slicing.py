"""Shared slicing logic: which positions of each tensor axis survive a plan."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from pruneplan.errors import AlreadyPrunedError, PlanMismatchError, quote
from pruneplan.plan import PrunePlan, extra_tensor, state_dict_digest

if TYPE_CHECKING:  # the file appliers use this module without torch
    import torch

__all__ = ["KeepMap", "check_fingerprint", "keep_indices", "kept_shape", "saved_names_in", "slice_tensor",
           "to_file_names", "to_plan_names"]

# tensor key -> [(axis, kept positions)], axes in increasing order
KeepMap = dict[str, list[tuple[int, list[int]]]]
V = TypeVar("V")


def saved_names_in(plan: PrunePlan, names: Iterable[str], where: str) -> dict[str, str]:
    """The plan's ``config.saved_names`` (state-dict key -> name ``save_pretrained`` stores it
    under) when the weights whose tensor names are ``names`` use them, else ``{}``.

    Weights use the saved names when they hold any of them (a folder ``save_pretrained`` wrote);
    weights named as the state dict (``save_pretrained(..., save_original_format=False)``, or
    ``safetensors.torch.save_file(model.state_dict())``) hold none of them.

    Raises:
        PlanMismatchError: the weights hold some tensors under their saved names and a renamed
            one under its state-dict name (naming it): two namings mixed.
    """
    saved = plan.config.saved_names if plan.config is not None else {}
    if not saved:
        return {}
    present = set(names)
    if not any(v in present for v in saved.values()):
        return {}
    targets = set(saved.values())
    mixed = sorted(k for k in saved if k in present and k not in targets)
    if mixed:
        raise PlanMismatchError(
            f"{where}: holds {quote(mixed[0])} under its state-dict name but other tensors under "
            f"the names save_pretrained gives them (e.g. {quote(saved[mixed[0]])}); the plan reads "
            "one naming or the other, not both"
        )
    return dict(saved)


def to_plan_names(tensors: Mapping[str, V], saved: Mapping[str, str]) -> dict[str, V]:
    """``tensors`` (named as in the weights) renamed to the state-dict keys of ``saved``
    (`saved_names_in`); names it does not list are kept."""
    if not saved:
        return dict(tensors)
    back = {v: k for k, v in saved.items()}
    return {back.get(k, k): v for k, v in tensors.items()}


def to_file_names(tensors: Mapping[str, V], saved: Mapping[str, str]) -> dict[str, V]:
    """``tensors`` (keyed by state-dict key) renamed to the names the weights store them under."""
    return {saved.get(k, k): v for k, v in tensors.items()}


def check_fingerprint(
    plan: PrunePlan,
    shapes: Mapping[str, Sequence[int]],
    where: str,
    check_digest: bool = True,
    pruned_check: bool = False,
) -> None:
    """Refuse weights whose tensors differ from the ones the plan was made for.

    Weights that hold every tensor of the plan under one name prefix (``module.``, as
    ``nn.DataParallel`` and ``DistributedDataParallel`` name them), or a plan whose names all
    carry such a prefix, are refused with a message saying so and what to pass instead.

    Args:
        shapes: every tensor of the weights, name -> shape.
        where: how to name the weights in messages (a path, "model", "state dict").
        check_digest: also compare the digest of all names and shapes.
        pruned_check: weights whose touched tensors all have the plan's pruned shapes (and the
            plan changes some) raise `AlreadyPrunedError` instead of a shape mismatch (a live
            model or a state dict: no metadata records the plan that pruned them).
    """
    missing = [k for k in plan.model.tensors if k not in shapes]
    if missing:
        wrapped = _wrapper_hint(plan, shapes, where, missing[0])
        if wrapped is not None:
            raise PlanMismatchError(wrapped)
        more = ""
        if len(missing) > 1:
            # most of them: another naming (transformers renames some models' keys on saving)
            more = (f" ({len(missing)} of the plan's {len(plan.model.tensors)} tensors are; do "
                    "these weights name the tensors as the model's state_dict does?)")
        raise PlanMismatchError(f"{where}: tensor {quote(missing[0])} named by the plan is missing{more}")
    pruned = plan.pruned_shapes()
    changed = [k for k, v in plan.model.tensors.items() if pruned[k] != list(v)]
    if pruned_check and changed and all([int(d) for d in shapes[k]] == pruned[k] for k in plan.model.tensors):
        k = changed[0]
        raise AlreadyPrunedError(
            f"{where}: already pruned: every tensor this plan ({plan.digest()[:12]}) touches has "
            f"the shape the plan leaves (e.g. {quote(k)}: {pruned[k]}, before pruning "
            f"{list(plan.model.tensors[k])}); apply the plan to the unpruned "
            f"{'model' if where == 'model' else 'weights'}"
        )
    for key, expected in plan.model.tensors.items():
        actual = [int(d) for d in shapes[key]]
        if actual != list(expected):
            raise PlanMismatchError(
                f"{where}: tensor {key!r} has shape {actual}, the plan expects {list(expected)}"
            )
    if check_digest:
        digest = state_dict_digest(shapes)
        if digest != plan.model.digest:
            raise PlanMismatchError(_digest_mismatch(plan, shapes, where, digest))


def _wrapper_hint(plan: PrunePlan, shapes: Mapping[str, Sequence[int]], where: str,
                  first_missing: str) -> str | None:
    """The message for weights that hold every tensor of the plan under one name prefix
    (``module.``: a model wrapped by ``nn.DataParallel`` or ``DistributedDataParallel``, or its
    state dict), or a plan made on such a wrapper applied to the bare model; ``None`` otherwise."""
    names = list(plan.model.tensors)
    live = where == "model"
    for name in shapes:  # weights = prefix + plan names
        if name.endswith("." + first_missing):
            prefix = name[: len(name) - len(first_missing)]
            if all(prefix + k in shapes for k in names):
                attr = prefix[:-1]
                how = (f"apply the plan to model.{attr} (nn.DataParallel replicates it at every "
                       "forward, so the wrapper then runs the pruned model)" if live else
                       f"strip {prefix!r} from the names (save model.{attr}.state_dict())")
                return (f"{where}: the plan's tensors are all here under the prefix {prefix!r} (e.g. "
                        f"{quote(prefix + first_missing)} for {quote(first_missing)}): the "
                        f"{'model is' if live else 'weights are from'} a wrapper such as "
                        f"nn.DataParallel; {how}")
    parts = first_missing.split(".")
    for i in range(1, len(parts)):  # plan names = prefix + weights
        prefix = ".".join(parts[:i]) + "."
        if all(k.startswith(prefix) and k[len(prefix):] in shapes for k in names):
            return (f"{where}: the plan names every tensor with the prefix {prefix!r} (e.g. "
                    f"{quote(first_missing)}), the {'model names' if live else 'weights name'} them "
                    f"without it: the plan was made on a wrapper such as nn.DataParallel; apply it "
                    f"to the wrapped model, or make the plan on the unwrapped one")
    return None


def _digest_mismatch(plan: PrunePlan, shapes: Mapping[str, Sequence[int]], where: str, digest: str) -> str:
    """What a digest mismatch means, with the touched tensors already checked: an untouched
    tensor is missing, extra or reshaped. The plan records only the digest of all names and
    shapes, so only a single extra tensor can be named (the one without which the digest
    matches)."""
    touched = plan.model.tensors
    extra = extra_tensor(shapes, plan.model.digest, [k for k in shapes if k not in touched])
    if extra is not None:
        return (f"{where}: tensor {quote(extra)} of shape {[int(d) for d in shapes[extra]]} is not in "
                "the model the plan was made for (without it, the names and shapes of the weights "
                "are the ones the plan records)")
    return (f"{where}: the names and shapes of the weights differ from the model the plan was made "
            f"for outside the {len(touched)} tensors the plan touches (those are present, with the "
            "shapes the plan expects): a tensor the plan does not touch is missing, extra, or has "
            f"another shape ({len(shapes)} tensors here, {len(shapes) - len(touched)} of them "
            "untouched; the plan records only a digest of all names and shapes: "
            f"{digest[:12]} here, {plan.model.digest[:12]} in the plan)")


def keep_indices(plan: PrunePlan) -> KeepMap:
    """For every sliced tensor, the positions to keep on each sliced axis."""
    out: KeepMap = {}
    for (tensor, axis), gone in plan.removed_by_axis().items():
        length = plan.model.tensors[tensor][axis]
        drop = set(gone)
        out.setdefault(tensor, []).append((axis, [i for i in range(length) if i not in drop]))
    for v in out.values():
        v.sort()
    return out


def kept_shape(shape: Sequence[int], keeps: Sequence[tuple[int, Sequence[int]]]) -> list[int]:
    """The shape of ``slice_tensor(t, keeps)`` for a tensor ``t`` of shape ``shape``."""
    out = [int(d) for d in shape]
    for axis, keep in keeps:
        out[axis] = len(keep)
    return out


def slice_tensor(t: torch.Tensor, keeps: Sequence[tuple[int, Sequence[int]]]) -> torch.Tensor:
    """A new contiguous tensor holding only the kept positions along each axis."""
    import torch

    out = t
    for axis, keep in keeps:
        if len(keep) == out.shape[axis]:
            continue
        idx = torch.as_tensor(keep, dtype=torch.long, device=t.device)
        out = out.index_select(axis, idx)
    return out.contiguous() if out is not t else out.clone()
