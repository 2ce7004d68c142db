"""Apply a plan to a live model and its optimizer, in place and atomically."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from pruneplan.apply._hf import config_changes, stage_cached_sizes, stage_model_dims
from pruneplan.apply._slicing import check_fingerprint, keep_indices, kept_shape, slice_tensor
from pruneplan.apply.content import check_content as _check_content
from pruneplan.apply.content import needs_content, no_data_message, tensors_without_data, weights_digest
from pruneplan.errors import OptimizerStateError, PlanMismatchError, quote
from pruneplan.hf_config import set_value
from pruneplan.modules import PrunedMultiheadAttention, make_pruned, pruned_class
from pruneplan.plan import PrunePlan

__all__ = ["apply_plan"]

log = logging.getLogger(__name__)


@dataclass
class _Staged:
    """Everything a plan will change, computed before anything is changed."""

    params: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    buffers: list[tuple[nn.Module, str, torch.Tensor]] = field(default_factory=list)
    state: list[tuple[dict, str, torch.Tensor]] = field(default_factory=list)
    attrs: list[tuple[nn.Module, str, object]] = field(default_factory=list)
    config: list[tuple[object, str, int]] = field(default_factory=list)
    swaps: list[tuple[nn.Module, type]] = field(default_factory=list)  # (module, new class)
    warnings: list[str] = field(default_factory=list)


def apply_plan(
    model: nn.Module,
    plan: PrunePlan,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    check_digest: bool = True,
    check_content: str = "warn",
) -> nn.Module:
    """Prune ``model`` (and ``optimizer``'s state) in place as ``plan`` says; return ``model``.

    Every check runs before the first change: on any error the model and optimizer are as
    before. Besides the plan's edits, the sizes that attention and MLP modules cache
    (``num_heads``, ``num_key_value_groups``, ``all_head_size``, GPT-2's ``split_size``,
    ``intermediate_size``...) are recomputed from the pruned weights, and a model with a Hugging
    Face ``config`` (duck-typed: ``config.to_dict``) gets the config changes the plan records
    (or, for a plan without them, the ones measured by `pruneplan.hf_config.config_edits`), so
    that ``save_pretrained`` writes a config ``from_pretrained`` loads. Widths the config cannot
    express (different per layer) are logged as a warning; the model itself is pruned.
    ``nn.Parameter`` objects are kept (optimizer references stay valid); their ``.grad`` and
    every optimizer state tensor shaped like them are sliced the same way, in every param group;
    scalar state such as ``step`` is kept.

    A plan made on the bare model does not apply to its ``nn.DataParallel`` wrapper (its tensors
    are named ``module.*``): pass ``model.module``, which the wrapper replicates at every forward
    (the wrapper is not unwrapped silently). Under ``DistributedDataParallel``, apply the plan
    to ``ddp.module`` on every rank and wrap the pruned module in a new
    ``DistributedDataParallel``: the old wrapper's gradient buckets were built for the unpruned
    sizes.

    ``check_digest`` also compares the digest of all state-dict names and shapes. When the plan
    records the content digest of the weights its metric scored, ``check_content`` says what
    happens if the model's weights differ: ``"warn"`` (a `WeightsContentWarning`; the default),
    ``"error"`` or ``"off"`` (skips hashing the weights). A model whose tensors hold no data (on
    the ``meta`` device) cannot be compared: ``"warn"`` logs that the check is skipped and prunes
    the shapes, ``"error"`` refuses.

    Raises:
        AlreadyPrunedError: every tensor the plan touches already has the shape the plan leaves
            (the model was pruned by it: apply the plan once, to the unpruned model).
        PlanMismatchError: shapes, module types or attribute values differ from the plan's,
            ``model`` is a ``DistributedDataParallel`` wrapper, ``model`` is another wrapper
            (``nn.DataParallel``: the plan's tensors are its ``module.*`` tensors; the message says
            to pass ``model.module``), or the weights' content differs
            (or, on the ``meta`` device, cannot be read) and ``check_content="error"``.
        PlanError: ``check_content`` is not ``"warn"``, ``"error"`` or ``"off"``.
        OptimizerStateError: the optimizer holds state for a pruned parameter that is not
            shaped like the parameter.
        ConfigError: the plan leaves grouped-query attention uneven (naming the layer).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise PlanMismatchError(
            "model is a DistributedDataParallel wrapper: apply the plan to ddp.module on every "
            "rank, then wrap the pruned module in a new DistributedDataParallel"
        )
    digest = plan.digest()  # everything that can fail runs before the first change
    staged = _stage(model, plan, optimizer, check_digest)
    if needs_content(plan, check_content):
        state = model.state_dict()
        empty = tensors_without_data(state)
        if not empty:
            _check_content(plan, weights_digest(state), "model", check_content)
        else:  # a model on the meta device: shapes only
            msg = (no_data_message("model", empty, len(state)) + ", so their content cannot be "
                   "compared with the weights the plan was scored on")
            if check_content == "error":
                raise PlanMismatchError(msg + "; pass check_content='off' to prune the shapes alone")
            log.warning("%s: the content check is skipped (check_content='off' skips it without "
                        "this message)", msg)
    with torch.no_grad():
        for p, data, grad in staged.params:
            _replace_data(p, data)
            p.grad = grad
        for module, name, value in staged.buffers:
            module._buffers[name] = value
        for state, key, value in staged.state:
            state[key] = value
        for module, attr, value in staged.attrs:
            setattr(module, attr, value)
        for config, key, value in staged.config:
            set_value(config, key, value)
        for module, cls in staged.swaps:
            make_pruned(module, cls)
    for problem in staged.warnings:
        log.warning("model.config cannot express the pruned model, so save_pretrained will write "
                    "a config that from_pretrained cannot load: %s", problem)
    log.info("applied plan %s: %d groups", digest[:12], len(plan.groups))
    return model


def _stage(
    model: nn.Module, plan: PrunePlan, optimizer: torch.optim.Optimizer | None, check_digest: bool
) -> _Staged:
    sd = model.state_dict(keep_vars=True)
    check_fingerprint(plan, {k: v.shape for k, v in sd.items()}, "model", check_digest,
                      pruned_check=True)
    modules = dict(model.named_modules(remove_duplicate=False))
    keeps = keep_indices(plan)
    staged = _Staged()
    opt_state = _optimizer_state(optimizer)

    done: dict[int, tuple[str, list]] = {}
    for key, keep in keeps.items():
        owner, _, name = key.rpartition(".")
        module = modules.get(owner)
        if module is None:
            raise PlanMismatchError(f"model: no module {owner!r} holds tensor {key!r}")
        tensor = sd[key]
        if isinstance(tensor, nn.Parameter):
            if id(tensor) in done:
                if done[id(tensor)][1] != keep:
                    raise PlanMismatchError(
                        f"model: tensor {key!r} is shared with {done[id(tensor)][0]!r} but the "
                        "plan slices them differently"
                    )
                continue
            done[id(tensor)] = (key, keep)
            data = slice_tensor(tensor.detach(), keep)
            grad = None if tensor.grad is None else slice_tensor(tensor.grad, keep)
            staged.params.append((tensor, data, grad))
            state = opt_state.get(tensor)
            if state is not None:
                staged.state += _stage_state(key, tensor, state, keep)
        elif name in module._buffers:
            staged.buffers.append((module, name, slice_tensor(tensor.detach(), keep)))
        else:
            raise PlanMismatchError(f"model: tensor {key!r} is neither a parameter nor a buffer")

    elements: dict[tuple[int, str], tuple[nn.Module, list]] = {}
    for (mod_name, attr), (before, after) in plan.edits().items():
        module = _module(modules, mod_name)
        base, index = _element(attr)
        if index is not None:  # one integer of a tuple attribute: "bias_shape[2]"
            value, held = _tuple_element(mod_name, module, base, index)
        else:
            value, as_tuple = _int_attribute(mod_name, module, attr)
        if value != before:
            raise PlanMismatchError(
                f"model: {quote(mod_name + '.' + attr)} is {value!r}, the plan expects {before} "
                "(was the model already pruned?)"
            )
        if index is not None:
            elements.setdefault((id(module), base), (module, list(held)))[1][index] = after
            continue
        staged.attrs.append((module, attr, (after,) if as_tuple else after))
    for (_, base), (module, values) in elements.items():
        current = getattr(module, base)
        staged.attrs.append((module, base, type(current)(values)))

    for mod_name, (before, after) in plan.dropout_changes().items():
        module = _module(modules, mod_name)
        p = getattr(module, "p", None)
        if not isinstance(p, float | int) or not math.isclose(p, before, abs_tol=1e-9):
            raise PlanMismatchError(
                f"model: dropout {mod_name!r} has rate {p!r}, the plan expects {before}"
            )
        staged.attrs.append((module, "p", after))
    _stage_swaps(model, modules, plan, staged)
    _stage_mirrors(modules, sd, keeps, staged)
    _stage_derived(model, plan, sd, keeps, staged)
    _check_flat_state(optimizer, [p for p, _, _ in staged.params])
    _check_consistent(modules, {k.rpartition(".")[0] for k in keeps} | {m for m, _ in plan.edits()},
                      staged, plan)
    return staged


def _stage_swaps(model: nn.Module, modules: dict[str, nn.Module], plan: PrunePlan,
                 staged: _Staged) -> None:
    """Attention modules whose own forward cannot run once their heads or widths are pruned
    (``nn.MultiheadAttention`` needs ``num_heads * head_dim == embed_dim``; torchvision's Swin
    attention takes the head size from the input width) become the class
    `pruneplan.modules.pruned_class` names (same object and parameters), when the plan edits
    them or their child layers; an ``nn.TransformerEncoder`` holding a pruned
    ``nn.MultiheadAttention`` stops converting its input to nested tensors (its fused path
    reads the sizes the same way)."""
    edited = {m for m, _ in plan.edits()}
    for name in sorted(edited | {n.rpartition(".")[0] for n in edited}):
        module = modules.get(name)
        if module is None:
            continue
        cls = pruned_class(module)
        if cls is None and isinstance(module, nn.MultiheadAttention):
            raise PlanMismatchError(
                f"model: module {quote(name)} ({type(module).__name__}) subclasses "
                "nn.MultiheadAttention; only nn.MultiheadAttention itself can run with fewer heads "
                "or a smaller width after pruning"
            )
        if cls is not None and type(module) is not cls:
            staged.swaps.append((module, cls))
    swapped = {id(m) for m, cls in staged.swaps if cls is PrunedMultiheadAttention}
    if not swapped:
        return
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False) \
                and any(id(x) in swapped for x in m.modules()):
            staged.attrs.append((m, "use_nested_tensor", False))


def _stage_mirrors(modules: dict[str, nn.Module], sd: dict, keeps: dict, staged: _Staged) -> None:
    """Constant 1-D non-persistent buffers (timm's zero ``k_bias``, concatenated between the
    ``q_bias`` and ``v_bias`` parameters into the bias of a fused qkv projection) have no
    state-dict entry a plan could slice: each takes the new length of the sliced 1-D tensors of
    its own module that were as long as it (when they all agree), filled with its constant."""
    for mod_name, module in modules.items():
        for bname in sorted(getattr(module, "_non_persistent_buffers_set", ())):
            buf = module._buffers.get(bname)
            if buf is None or buf.dim() != 1 or not buf.numel():
                continue
            prefix = f"{mod_name}." if mod_name else ""
            lengths = {len(keep[0][1]) for key, keep in keeps.items()
                       if key.rpartition(".")[0] == mod_name and key.startswith(prefix)
                       and sd[key].dim() == 1 and sd[key].shape[0] == buf.shape[0]}
            if len(lengths) != 1 or not bool((buf == buf[0]).all()):
                continue
            (length,) = lengths
            staged.buffers.append((module, bname, buf.new_full((length,), buf[0].item())))


def _element(attr: str) -> tuple[str, int | None]:
    """``"bias_shape[2]"`` -> ``("bias_shape", 2)``; a plain name -> ``(attr, None)``."""
    if attr.endswith("]") and "[" in attr:
        base, _, index = attr[:-1].partition("[")
        if base and index.isdigit():
            return base, int(index)
    return attr, None


def _tuple_element(name: str, module: nn.Module, base: str, index: int) -> tuple[int, tuple]:
    """Integer ``index`` of the tuple (or list) of integers ``module.base`` (a shape a module
    keeps for a view, timm's ``bias_shape``), and the whole tuple.

    Raises:
        PlanMismatchError: no such attribute, not a tuple of integers, or the index is out of
            its range.
    """
    where = f"model: {quote(name + '.' + base)} ({type(module).__name__})"
    current = getattr(module, base, None)
    if not isinstance(current, tuple | list) or not all(type(v) is int for v in current):
        raise PlanMismatchError(f"{where} is {quote(current, 40)}, not a tuple of integers; the "
                                f"plan edits its element {index}")
    if index >= len(current):
        raise PlanMismatchError(f"{where} has {len(current)} elements; the plan edits element {index}")
    return current[index], tuple(current)


def _int_attribute(name: str, module: nn.Module, attr: str) -> tuple[int, bool]:
    """The value of the integer hyper-parameter ``module.attr`` (a 1-tuple such as LayerNorm's
    ``normalized_shape`` counts), and whether it is held as a tuple.

    Raises:
        PlanMismatchError: the attribute is missing, is a parameter, buffer or submodule, is
            read-only, or is not an integer.
    """
    where = f"model: {quote(name + '.' + attr)} ({type(module).__name__})"
    for kind, table in (("parameter", module._parameters), ("buffer", module._buffers),
                        ("submodule", module._modules)):
        if attr in table:
            raise PlanMismatchError(
                f"{where} is a {kind}; a plan may only edit integer hyper-parameters of a module"
            )
    if not hasattr(module, attr):
        raise PlanMismatchError(f"model: module {quote(name)} ({type(module).__name__}) has no "
                                f"attribute {quote(attr)}")
    descriptor = getattr(type(module), attr, None)
    if isinstance(descriptor, property) and descriptor.fset is None:
        raise PlanMismatchError(f"{where} is a read-only property; a plan cannot edit it")
    current = getattr(module, attr)
    as_tuple = isinstance(current, tuple | list) and len(current) == 1
    value = current[0] if as_tuple else current
    if type(value) is not int:
        raise PlanMismatchError(
            f"{where} is {quote(current, 40)} (a {type(current).__name__}), not an integer "
            "hyper-parameter; a plan may only edit integer hyper-parameters of a module"
        )
    return value, as_tuple


def _final_shapes(module: nn.Module, staged: _Staged) -> dict[str, list[int]]:
    """Shapes of a module's own parameters and buffers once ``staged`` is applied."""
    new_params = {id(p): list(data.shape) for p, data, _ in staged.params}
    new_buffers = {(id(m), n): list(v.shape) for m, n, v in staged.buffers}
    out = {}
    for n, p in module._parameters.items():
        if p is not None:
            out[n] = new_params.get(id(p), list(p.shape))
    for n, b in module._buffers.items():
        if b is not None:
            out[n] = new_buffers.get((id(module), n), list(b.shape))
    return out


def _expected_shapes(module: nn.Module, get) -> dict[str, list[int]] | str:
    """What the integer attributes of a standard torch layer say its tensors' shapes are, or a
    string saying which attributes disagree with each other; {} for other layers."""
    if isinstance(module, nn.Linear):
        return {"weight": [get("out_features"), get("in_features")], "bias": [get("out_features")]}
    if isinstance(module, nn.modules.conv._ConvNd):
        cin, cout, groups = get("in_channels"), get("out_channels"), get("groups")
        if cin % groups or cout % groups:
            return f"in_channels {cin} and out_channels {cout} are not multiples of groups {groups}"
        kernel = list(module.kernel_size)
        if module.transposed:
            return {"weight": [cin, cout // groups, *kernel], "bias": [cout]}
        return {"weight": [cout, cin // groups, *kernel], "bias": [cout]}
    if isinstance(module, nn.modules.batchnorm._NormBase):
        n = get("num_features")
        return {k: [n] for k in ("weight", "bias", "running_mean", "running_var")}
    if isinstance(module, nn.GroupNorm):
        channels, groups = get("num_channels"), get("num_groups")
        if channels % groups:
            return f"num_channels {channels} is not a multiple of num_groups {groups}"
        return {"weight": [channels], "bias": [channels]}
    if isinstance(module, nn.LayerNorm | getattr(nn, "RMSNorm", nn.LayerNorm)):
        return {"weight": list(get("normalized_shape")), "bias": list(get("normalized_shape"))}
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return {"weight": [get("num_embeddings"), get("embedding_dim")]}
    if isinstance(module, nn.PReLU):
        return {"weight": [get("num_parameters")]}
    if isinstance(module, nn.MultiheadAttention):  # inner width: num_heads * head_dim
        inner, e = get("num_heads") * get("head_dim"), get("embed_dim")
        return {"in_proj_weight": [3 * inner, e], "in_proj_bias": [3 * inner],
                "q_proj_weight": [inner, e], "k_proj_weight": [inner, get("kdim")],
                "v_proj_weight": [inner, get("vdim")], "bias_k": [1, 1, inner], "bias_v": [1, 1, inner]}
    return {}


def _check_consistent(modules: dict[str, nn.Module], touched: set[str], staged: _Staged,
                      plan: PrunePlan) -> None:
    """Refuse a plan that would leave a standard layer's tensors and attributes disagreeing
    (a bias slice left out, an edit forgotten), before anything changes.

    A dimension is checked when the plan's edits change what the layer's attributes say it is,
    or when a group that edits attributes slices it. A group of slices alone (the raw tensor
    surgery of `Pruner.prune_parameter`, which leaves attributes as they are by design) is
    not second-guessed.
    """
    new_attrs = {(id(m), a): v for m, a, v in staged.attrs}
    structured = {(s.tensor.rpartition(".")[0], s.tensor.rpartition(".")[2], s.axis)
                  for g in plan.groups if g.edits for s in g.slices}
    for name in sorted(touched):
        module = modules.get(name)
        if module is None:
            continue

        def after(attr: str, module: nn.Module = module) -> object:
            return new_attrs.get((id(module), attr), getattr(module, attr))

        def before(attr: str, module: nn.Module = module) -> object:
            return getattr(module, attr)

        try:
            expected = _expected_shapes(module, after)
            was = _expected_shapes(module, before)
            if isinstance(expected, dict):
                expected = {k: [int(d) for d in v] for k, v in expected.items()}
            if isinstance(was, dict):
                was = {k: [int(d) for d in v] for k, v in was.items()}
        except (AttributeError, TypeError, ValueError):
            continue  # a subclass that holds its sizes otherwise: nothing to compare
        what = f"model: the plan would leave module {quote(name)} ({type(module).__name__}) inconsistent"
        if isinstance(expected, str):
            if was != expected:  # the plan's edits broke it
                raise PlanMismatchError(f"{what}: {expected}")
            continue
        if not isinstance(was, dict):
            continue
        final = _final_shapes(module, staged)
        for tensor, shape in sorted(expected.items()):
            if tensor not in final or len(final[tensor]) != len(shape):
                continue
            for d, want in enumerate(shape):
                checked = was.get(tensor, shape)[d] != want or (name, tensor, d) in structured
                if checked and final[tensor][d] != want:
                    raise PlanMismatchError(
                        f"{what}: {tensor} would have shape {final[tensor]} but its attributes say "
                        f"{shape} (a slice or an edit is missing from the plan)"
                    )
def _stage_derived(model: nn.Module, plan: PrunePlan, sd: dict, keeps: dict, staged: _Staged) -> None:
    """Stage the sizes modules cache and, for a Hugging Face model, the ``config`` changes."""
    old = {k: list(v.shape) for k, v in sd.items()}
    new = {k: kept_shape(old[k], keeps.get(k, ())) for k in old}
    planned = {(id(m), a): v for m, a, v in staged.attrs}
    for module, attr, value, name in stage_cached_sizes(model, old, new):
        key = (id(module), attr)
        if key in planned:
            if planned[key] != value:
                raise PlanMismatchError(
                    f"model: the plan sets {name}.{attr} to {planned[key]}, the pruned weights "
                    f"imply {value}"
                )
            continue
        planned[key] = value
        staged.attrs.append((module, attr, value))
    config, values, problems = config_changes(model, plan, old)
    for module, attr, value, _ in stage_model_dims(model, config, values):
        if (id(module), attr) not in planned:
            staged.attrs.append((module, attr, value))
    staged.config = [(config, key, value) for key, value in values.items()]
    staged.warnings = problems


def _check_flat_state(optimizer: torch.optim.Optimizer | None, pruned: list[nn.Parameter]) -> None:
    """Refuse optimizers whose state spans all parameters at once (LBFGS), not per parameter.

    LBFGS keeps flat vectors over every parameter (``d``, ``prev_flat_grad``, its history) under
    the first one and caches the total size; pruning any of its parameters would only fail at
    the next ``step()``.
    """
    if not isinstance(optimizer, torch.optim.LBFGS) or not pruned:
        return
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not any(id(p) in ids for p in pruned):
        return
    if any(optimizer.state.values()) or getattr(optimizer, "_numel_cache", None) is not None:
        raise OptimizerStateError(
            "optimizer LBFGS keeps flat state over all its parameters ('d', 'prev_flat_grad', "
            "history): cannot slice it for a pruned parameter; prune before its first step or "
            "build a new LBFGS after pruning"
        )


def _replace_data(p: nn.Parameter, data: torch.Tensor) -> None:
    """Give ``p`` new data of another shape, keeping the Python object.

    ``torch.utils.swap_tensors`` also renews the autograd metadata, so a graph built before
    pruning (a loss still referenced) cannot pin the old shape in the gradient accumulator.
    Where swapping is impossible (another reference to the tensor's storage, weak references)
    it falls back to ``p.data = data``.
    """
    fresh = nn.Parameter(data, requires_grad=p.requires_grad)
    try:
        torch.utils.swap_tensors(p, fresh)
    except RuntimeError as exc:
        if "weakref" in str(exc):  # a module's own weak references (nn.LSTM/GRU/RNN keep them)
            p.grad = None
            p.data = data
            return
        warnings.warn(
            f"pruneplan: a parameter of shape {list(p.shape)} is still held by a graph built "
            f"before pruning ({exc}); assigning .data instead. Drop outputs/losses computed "
            "before pruning, or the next backward may see the old shape.",
            stacklevel=4,
        )
        p.grad = None
        p.data = data


def _module(modules: dict[str, nn.Module], name: str) -> nn.Module:
    if name not in modules:
        raise PlanMismatchError(f"model: no module named {quote(name)}")
    return modules[name]


def _optimizer_state(optimizer: torch.optim.Optimizer | None) -> dict[nn.Parameter, dict]:
    if optimizer is None:
        return {}
    return {p: optimizer.state[p] for group in optimizer.param_groups for p in group["params"]
            if p in optimizer.state}


def _stage_state(key: str, p: nn.Parameter, state: dict, keep: list) -> list:
    out = []
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.shape == p.shape:
            out.append((state, name, slice_tensor(value.detach(), keep)))
        elif value.dim() == 0 or (value.numel() == 1 and p.numel() != 1):
            continue  # scalar state such as `step`
        else:
            raise OptimizerStateError(
                f"optimizer state {name!r} of parameter {key!r} has shape {list(value.shape)}, "
                f"not the parameter's {list(p.shape)}: cannot slice it"
            )
    return out
