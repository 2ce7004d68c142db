"""Layers that `apply_plan` swaps in where a pruned torch layer can no longer run its own forward.

``nn.MultiheadAttention`` hands its weights to ``F.multi_head_attention_forward``, which derives
``head_dim = embed_dim // num_heads`` from the width of the query and requires the projections
to be ``embed_dim`` wide (``in_proj_weight`` of shape ``(3 * embed_dim, embed_dim)``). Once heads
are removed the inner width ``num_heads * head_dim`` is smaller than ``embed_dim``; once the
hidden size is removed ``embed_dim`` is smaller than the inner width. Neither runs there, so
`apply_plan` turns such a module into a `PrunedMultiheadAttention` (the same object, its class
changed: parameters, their names and the optimizer's references stay), whose ``forward`` does
what torch's does with the inner width taken from ``num_heads * head_dim``.

torchvision's Swin attention (``ShiftedWindowAttention`` and its V2) calls the fx-wrapped
function ``shifted_window_attention``, which takes the head size and the output width from the
input width (``C // num_heads``, ``C``); a pruned one becomes ``PrunedShiftedWindowAttention``
(``...V2``), whose forward calls `pruned_shifted_window_attention`, which reads them from the
weights. Those two classes subclass torchvision's and are made on first use (torchvision is
optional), as attributes of this module (so pickling finds them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HeadsOutput", "PrunedMultiheadAttention", "heads_projection", "heads_sites",
           "make_pruned", "prune_ready", "pruned_class", "pruned_shifted_window_attention"]


def _float_mask(mask: Tensor | None, dtype: torch.dtype, what: str) -> Tensor | None:
    """A boolean mask as an additive float mask (``-inf`` where True); float masks as they are."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {what} are supported")
    return mask


class HeadsOutput(nn.Identity):
    """Where a `PrunedMultiheadAttention` hands the outputs of its heads, concatenated
    ``(batch, L, num_heads * head_dim)`` (head ``h`` at ``h*head_dim .. h*head_dim+head_dim-1`` of the
    last axis), to ``out_proj``: an identity whose hooks see them (the attribution metrics
    score heads there, see `heads_sites`)."""

    features_last = True  # the attribution metrics' unit axis is the last one


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose inner width ``num_heads * head_dim`` may differ from
    ``embed_dim`` (heads removed, or the hidden size removed).

    Attributes read by ``forward``: ``embed_dim`` (query width = output width), ``kdim`` and
    ``vdim`` (key and value widths), ``num_heads``, ``head_dim`` (kept from the original),
    ``batch_first``, ``dropout``, ``add_zero_attn``. Tensors: ``in_proj_weight``
    ``(3 * num_heads * head_dim, embed_dim)`` (q, k, v stacked) or ``q_proj_weight``
    ``(num_heads * head_dim, embed_dim)``, ``k_proj_weight`` ``(.., kdim)``, ``v_proj_weight``
    ``(.., vdim)``; ``in_proj_bias`` ``(3 * num_heads * head_dim,)``; ``bias_k`` / ``bias_v``
    ``(1, 1, num_heads * head_dim)``; ``out_proj`` ``(embed_dim, num_heads * head_dim)``.

    ``forward`` takes torch's arguments and returns what torch's returns (attention weights per
    head have ``num_heads`` heads, the ones kept). A 3-D ``attn_mask`` must be
    ``(batch * num_heads, L, S)`` for the heads kept. ``_qkv_same_embed_dim`` is False so that
    ``nn.TransformerEncoderLayer`` takes its ordinary path instead of its fused kernel (which
    reads ``embed_dim`` as the inner width). While the heads are scored (`heads_sites`), their
    outputs reach ``out_proj`` through a child ``heads_output`` (a `HeadsOutput`).
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        is_batched = query.dim() == 3
        same = query is key and key is value  # self-attention: one product with the packed weight
        if self.batch_first and is_batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not is_batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt, bsz, _ = query.shape
        heads, hd = self.num_heads, self.head_dim
        inner = heads * hd
        key_padding_mask = _float_mask(key_padding_mask, query.dtype, "key_padding_mask")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = _float_mask(attn_mask, query.dtype, "attn_mask")
            if key_padding_mask is not None:
                is_causal = False
        if self.in_proj_weight is not None and same:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).split(inner, dim=-1)
        else:
            if self.in_proj_weight is not None:
                w_q, w_k, w_v = self.in_proj_weight.split(inner)
            else:
                w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            b_q = b_k = b_v = None
            if self.in_proj_bias is not None:
                b_q, b_k, b_v = self.in_proj_bias.split(inner)
            q = F.linear(query, w_q, b_q)
            k = F.linear(key, w_k, b_k)
            v = F.linear(value, w_v, b_v)
        src = k.shape[0]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (tgt, src):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, "
                                       f"but should be {(tgt, src)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if tuple(attn_mask.shape) != (bsz * heads, tgt, src):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, but should be "
                        f"{(bsz * heads, tgt, src)}: this attention keeps {heads} heads")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        q = q.reshape(tgt, bsz * heads, hd).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, hd).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, hd).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, hd), dtype=k.dtype, device=k.device)
            k = torch.cat([k, zeros], dim=1)
            v = torch.cat([v, zeros], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src = k.size(1)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (bsz, src):
                raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src)}, but got "
                                     f"{tuple(key_padding_mask.shape)}")
            kpm = key_padding_mask.view(bsz, 1, 1, src).expand(-1, heads, -1, -1).reshape(
                bsz * heads, 1, src)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            if is_causal and attn_mask is None:
                raise AssertionError("is_causal without attn_mask is not implemented for need_weights")
            q_scaled = q * math.sqrt(1.0 / float(hd))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = torch.softmax(weights, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt * bsz, inner)
            weights = weights.view(bsz, heads, tgt, src)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, heads, -1, src)
            out = F.scaled_dot_product_attention(
                q.view(bsz, heads, tgt, hd), k.view(bsz, heads, src, hd),
                v.view(bsz, heads, src, hd), attn_mask, p, is_causal)
            out = out.permute(2, 0, 1, 3).reshape(tgt * bsz, inner)
        site = self._modules.get("heads_output")
        if site is not None:  # (L*N, I) -> the site sees (N, L, I), batch first
            out = site(out.view(tgt, bsz, inner).transpose(0, 1)).transpose(0, 1).reshape(tgt * bsz, inner)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt, bsz, -1)
        if not is_batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def prune_ready(module: nn.Module) -> None:
    """Turn ``module`` into its `pruned_class` in place (the object, its parameters and their
    names stay); nothing for a module without one."""
    cls = pruned_class(module)
    if cls is not None:
        make_pruned(module, cls)


def make_pruned(module: nn.Module, cls: type) -> None:
    """Give ``module`` the class ``cls`` (from `pruned_class`) in place."""
    module.__class__ = cls
    if cls is PrunedMultiheadAttention:
        module._qkv_same_embed_dim = False


def _regions(ph: int, pw: int, wh: int, ww: int, sh: int, sw: int, like: Tensor) -> Tensor:
    """Region id of every position of a ``(ph, pw)`` map rolled by ``(-sh, -sw)``: tokens of a
    window attend only to tokens of their own region. Rows ``[0, ph-wh)``, ``[ph-wh, ph-sh)``
    and ``[ph-sh, ph)`` are regions 0, 1, 2 (one region when ``sh == 0``), columns alike."""
    ids = like.new_zeros((ph, pw))
    rows = [0, ph - wh, ph - sh, ph] if sh else [0, ph]
    cols = [0, pw - ww, pw - sw, pw] if sw else [0, pw]
    for i in range(len(rows) - 1):
        for j in range(len(cols) - 1):
            ids[rows[i]:rows[i + 1], cols[j]:cols[j + 1]] = i * 3 + j
    return ids


def pruned_shifted_window_attention(
    input: Tensor,
    qkv_weight: Tensor,
    proj_weight: Tensor,
    relative_position_bias: Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: Tensor | None = None,
    proj_bias: Tensor | None = None,
    logit_scale: Tensor | None = None,
    training: bool = True,
    heads_output: Any = None,
) -> Tensor:
    """Swin's (shifted) window attention, as torchvision's ``shifted_window_attention``, with
    the widths read from the weights instead of the input: inner width ``I =
    qkv_weight.shape[0] // 3``, ``head_dim = I // num_heads``, output width
    ``proj_weight.shape[0]``.

    Args:
        input: ``(B, H, W, C)``; qkv_weight ``(3I, C)``; proj_weight ``(C_out, I)``;
        relative_position_bias: ``(1, num_heads, T, T)`` with ``T`` tokens per window;
        logit_scale: Swin V2's cosine attention scale ``(num_heads, 1, 1)`` (its key bias is
            zeroed as in V2).
        heads_output: a module the heads' outputs pass through before ``proj``, seen as
            ``(B, windows * T, I)`` (`HeadsOutput`, while they are scored).

    Returns:
        ``(B, H, W, C_out)``.
    """
    b, h, w, _ = input.shape
    wh, ww = window_size
    inner = qkv_weight.shape[0] // 3
    hd = inner // num_heads
    x = F.pad(input, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
    ph, pw = x.shape[1], x.shape[2]
    sh = 0 if wh >= ph else shift_size[0]
    sw = 0 if ww >= pw else shift_size[1]
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    nh, nw, tokens = ph // wh, pw // ww, wh * ww
    x = x.view(b, nh, wh, nw, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, tokens, -1)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = torch.cat([qkv_bias[:inner], torch.zeros_like(qkv_bias[inner:2 * inner]),
                              qkv_bias[2 * inner:]])
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(x.shape[0], tokens, 3, num_heads, hd)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * hd ** -0.5) @ k.transpose(-2, -1)
    attn = attn + relative_position_bias
    if sh or sw:
        ids = _regions(ph, pw, wh, ww, sh, sw, x)
        ids = ids.view(nh, wh, nw, ww).permute(0, 2, 1, 3).reshape(nh * nw, tokens)
        same = ids.unsqueeze(1) == ids.unsqueeze(2)
        mask = torch.zeros_like(same, dtype=attn.dtype).masked_fill(~same, -100.0)
        attn = attn.view(b, nh * nw, num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, tokens, tokens)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = (attn @ v).transpose(1, 2).reshape(x.shape[0], tokens, inner)
    if heads_output is not None:  # batch first for the metrics: (B, windows * T, I)
        x = heads_output(x.reshape(b, -1, inner)).reshape(-1, tokens, inner)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    x = x.view(b, nh, nw, wh, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, -1)
    if sh or sw:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


torch.fx.wrap("pruned_shifted_window_attention")

_SWIN = "torchvision.models.swin_transformer"
_SWIN_CLASSES = {"PrunedShiftedWindowAttention": "ShiftedWindowAttention",
                 "PrunedShiftedWindowAttentionV2": "ShiftedWindowAttentionV2"}
_built: dict[str, type] = {}


def _swin_forward(self: Any, x: Tensor) -> Tensor:
    """``(B, H, W, C) -> (B, H, W, C_out)`` with `pruned_shifted_window_attention`."""
    return pruned_shifted_window_attention(
        x, self.qkv.weight, self.proj.weight, self.get_relative_position_bias(), self.window_size,
        self.num_heads, shift_size=self.shift_size, attention_dropout=self.attention_dropout,
        dropout=self.dropout, qkv_bias=self.qkv.bias, proj_bias=self.proj.bias,
        logit_scale=getattr(self, "logit_scale", None), training=self.training,
        heads_output=self._modules.get("heads_output"))


def _swin_class(name: str) -> type:
    cls = _built.get(name)
    if cls is None:
        import importlib

        base = getattr(importlib.import_module(_SWIN), _SWIN_CLASSES[name])
        cls = type(name, (base,), {
            "forward": _swin_forward, "__module__": __name__,
            "__doc__": f"torchvision's ``{base.__name__}`` with its heads or widths pruned: "
                       "its forward calls `pruned_shifted_window_attention`."})
        _built[name] = cls
    return cls


def __getattr__(name: str) -> type:
    if name in _SWIN_CLASSES:
        return _swin_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pruned_class(module: nn.Module) -> type | None:
    """The class `apply_plan` gives ``module`` once its heads or widths are pruned (``None``:
    it keeps its own; the class itself when it is one already)."""
    t = type(module)
    if t in (nn.MultiheadAttention, PrunedMultiheadAttention):
        return PrunedMultiheadAttention
    if t in _built.values():
        return t
    if t.__module__ == _SWIN:
        for pruned, base in _SWIN_CLASSES.items():
            if t.__qualname__ == base:
                return _swin_class(pruned)
    return None


@contextmanager
def heads_sites(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, str]]:
    """Where the data-driven metrics score the heads of the attention modules among ``names``
    (``nn.MultiheadAttention``, torchvision's Swin attention): a `HeadsOutput` child, added for
    the run, through which the heads' outputs reach the output projection. Yields ``{module
    name: site name}``; inside, those modules have their `pruned_class` (it computes the same
    outputs); on exit they are exactly as before."""
    undo: list[tuple[nn.Module, type, Any]] = []
    sites: dict[str, str] = {}
    try:
        for name in names:
            m = model.get_submodule(name)
            cls = pruned_class(m)
            if cls is None or "heads_output" in m._modules:
                continue
            undo.append((m, type(m), m.__dict__.get("_qkv_same_embed_dim")))
            make_pruned(m, cls)
            m.heads_output = HeadsOutput()
            sites[name] = f"{name}.heads_output" if name else "heads_output"
        yield sites
    finally:
        for m, cls, same in reversed(undo):
            del m._modules["heads_output"]
            m.__class__ = cls
            if same is not None:
                m._qkv_same_embed_dim = same


def heads_projection(module: nn.Module) -> str | None:
    """The child layer of an attention module whose input columns its heads own (``out_proj``
    of ``nn.MultiheadAttention``, ``proj`` of Swin's), or ``None``."""
    if isinstance(module, nn.MultiheadAttention):
        return "out_proj"
    cls = pruned_class(module)
    return "proj" if cls is not None and cls.__name__.startswith("PrunedShiftedWindow") else None
