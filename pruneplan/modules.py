"""Layers that `apply_plan` swaps in where a pruned torch layer can no longer run its own forward.

``nn.MultiheadAttention`` hands its weights to ``F.multi_head_attention_forward``, which derives
``head_dim = embed_dim // num_heads`` from the width of the query and requires the projections
to be ``embed_dim`` wide (``in_proj_weight`` of shape ``(3 * embed_dim, embed_dim)``). Once heads
are removed the inner width ``num_heads * head_dim`` is smaller than ``embed_dim``; once the
hidden size is removed ``embed_dim`` is smaller than the inner width. Neither runs there, so
`apply_plan` turns such a module into a `PrunedMultiheadAttention` (the same object, its class
changed: parameters, their names and the optimizer's references stay), whose ``forward`` does
what torch's does with the inner width taken from ``num_heads * head_dim``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PrunedMultiheadAttention"]


def _float_mask(mask: Tensor | None, dtype: torch.dtype, what: str) -> Tensor | None:
    """A boolean mask as an additive float mask (``-inf`` where True); float masks as they are."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {what} are supported")
    return mask


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
    reads ``embed_dim`` as the inner width).
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
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt, bsz, -1)
        if not is_batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def prune_ready(module: nn.Module) -> None:
    """Turn an ``nn.MultiheadAttention`` into a `PrunedMultiheadAttention` in place (the
    object, its parameters and their names stay)."""
    module.__class__ = PrunedMultiheadAttention
    module._qkv_same_embed_dim = False
