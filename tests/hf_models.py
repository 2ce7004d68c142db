"""Hugging Face architectures built small from a config (random weights, nothing downloaded),
and the check each one goes through. Shared by benchmarks/hf_coverage.py (the sweep, writing
docs/hf_coverage.md) and tests/test_hf_real.py (a representative subset, marked ``real``).

Every model: 2 layers, hidden 64, 4 query heads (2 key/value heads where the architecture has
grouped-query attention), MLP 128, vocabulary 128. The check (`check`):

1. discovery (`prunable_groups`), groups counted per kind (heads, query groups, hidden: a
   channels group slicing a layer/RMS norm, other channels: MLP widths, convolutions);
2. *zeroing*: every group that slices no layer/RMS/group norm (heads, MLP widths) planned with
   `plan_from_metric` (``weight_norm``, a data-free metric, `RATIOS` per kind: 30% of the
   channels, half the query heads; the same count in every layer where the config needs it)
   and applied to a copy;
   its output equals the original's with the removed units zeroed where they enter the layer
   that consumes them (a forward pre-hook on the consuming Linear/Conv1D/ConvNd), DESIGN
   invariant 1. A group spanning a norm is left to step 3 (removing a channel under a norm
   is not zeroing it);
3. *full*: every group (hidden size included) planned the same way; the config must hold
   it (``plan.config.problems()`` empty); applied; the output shape is unchanged;
   ``save_pretrained`` + ``from_pretrained`` loads cleanly (no missing, unexpected or
   mismatched keys) and gives the live pruned model's output exactly; ``pruneplan apply`` (the
   CLI) on the original model's saved folder, then ``from_pretrained(OUT)``, gives it exactly.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

RATIO = 0.3
#: per kind: 30% of the channels (MLP widths, hidden size), half the query heads (4 -> 2: 30% of
#: 4 heads is one, which 2 key/value heads cannot lose evenly; grouped-query attention is pruned
#: by its query heads, the same count from every key/value head)
RATIOS = {"channels": RATIO, "heads": 0.5}
MIN_PARAM_DROP = 0.2
V = 128  # vocabulary
NORM_NAMES = ("LayerNorm", "RMSNorm", "RmsNorm", "GroupNorm")  # a norm over the channels


@dataclass(frozen=True)
class HFModel:
    """One architecture: the config class and its keyword arguments, the model class, the input
    builder (``"ids"``, ``"seq2seq"``, ``"audio"``, ``"pixels"``, ``"clip"``), for one that
    fails today the reason (``xfail``: the exception class name and the reason), and whether
    the hidden size reaches the model output (``include_output``: an encoder-decoder returns
    the encoder's last hidden state beside the logits, which keep their shape)."""

    name: str
    config: str
    model: str
    kwargs: dict
    inputs: str = "ids"
    family: str = ""
    xfail: tuple[str, str] | None = None
    include_output: bool = False  # the output holds the hidden size (an encoder's last state)

    def build(self, seed: int = 0) -> nn.Module:
        import transformers

        cfg = getattr(transformers, self.config)(**self.kwargs)
        torch.manual_seed(seed)
        return getattr(transformers, self.model)(cfg).eval()

    def example(self, model: nn.Module) -> tuple:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, V, (2, 7), generator=g)
        if self.inputs == "ids":
            return (ids,)
        if self.inputs == "seq2seq":  # input_ids, attention_mask, decoder_input_ids
            return ids, None, torch.randint(3, V, (2, 5), generator=g)
        if self.inputs == "audio":  # input_features (B, mel, 2 * max_source_positions)
            c = model.config
            feats = torch.randn(2, c.num_mel_bins, 2 * c.max_source_positions, generator=g)
            return feats, None, torch.randint(3, V, (2, 5), generator=g)
        pixels = torch.randn(2, 3, 32, 32, generator=g)
        if self.inputs == "pixels":
            return (pixels,)
        if self.inputs == "clip":  # input_ids, pixel_values
            return ids, pixels
        raise ValueError(self.inputs)


# the common decoder-only shape: 2 layers, hidden 64, 4 query / 2 key-value heads of 16, MLP 128
_LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)
_ENC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=V, max_position_embeddings=64, num_labels=3)
_S2S = dict(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=V,
            max_position_embeddings=64)
_VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, num_labels=3)


def _lm(name: str, prefix: str, **kw: Any) -> HFModel:
    args = {**_LM, **kw}
    return HFModel(name, f"{prefix}Config", f"{prefix}ForCausalLM",
                   {k: v for k, v in args.items() if v is not None}, family="causal LM")


def _enc(name: str, prefix: str, **kw: Any) -> HFModel:
    return HFModel(name, f"{prefix}Config", f"{prefix}ForSequenceClassification",
                   {**_ENC, **kw}, family="encoder")


MODELS: list[HFModel] = [
    _lm("llama", "Llama"),
    _lm("mistral", "Mistral"),
    _lm("qwen2", "Qwen2"),
    _lm("qwen3", "Qwen3", head_dim=16),
    _lm("gemma", "Gemma", head_dim=16),
    _lm("gemma2", "Gemma2", head_dim=16),
    HFModel("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM",
            {**_LM, "head_dim": 16, "sliding_window": 4}, family="causal LM"),
    _lm("phi", "Phi"),
    _lm("phi3", "Phi3", pad_token_id=0),
    _lm("granite", "Granite"),
    _lm("cohere", "Cohere"),
    _lm("olmo", "Olmo"),
    _lm("olmo2", "Olmo2"),
    _lm("stablelm", "StableLm"),
    _lm("starcoder2", "Starcoder2"),
    _lm("qwen2_moe", "Qwen2Moe", moe_intermediate_size=64, shared_expert_intermediate_size=128,
        num_experts=4, num_experts_per_tok=2),
    _lm("qwen3_moe", "Qwen3Moe", head_dim=16, moe_intermediate_size=64, num_experts=4,
        num_experts_per_tok=2),
    HFModel("opt", "OPTConfig", "OPTForCausalLM",
            dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=V, max_position_embeddings=64, word_embed_proj_dim=64),
            family="causal LM"),
    HFModel("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM",
            dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=V, max_position_embeddings=64),
            family="causal LM"),
    HFModel("gptj", "GPTJConfig", "GPTJForCausalLM",
            dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, vocab_size=V, n_positions=64,
                 rotary_dim=8), family="causal LM"),
    HFModel("bloom", "BloomConfig", "BloomForCausalLM",
            dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=V), family="causal LM"),
    _enc("roberta", "Roberta"),
    _enc("xlm_roberta", "XLMRoberta"),
    _enc("electra", "Electra", embedding_size=64),
    _enc("albert", "Albert", embedding_size=32),
    _enc("deberta_v2", "DebertaV2"),
    HFModel("bart", "BartConfig", "BartForConditionalGeneration", _S2S, "seq2seq", "seq2seq",
            include_output=True),
    HFModel("whisper", "WhisperConfig", "WhisperForConditionalGeneration",
            {**{k: v for k, v in _S2S.items() if k != "max_position_embeddings"},
             "num_mel_bins": 16, "max_source_positions": 8, "max_target_positions": 16,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
             "decoder_start_token_id": 1},
            "audio", "seq2seq", include_output=True),
    HFModel("deit", "DeiTConfig", "DeiTForImageClassification", _VIT, "pixels", "vision"),
    HFModel("swin", "SwinConfig", "SwinForImageClassification",
            dict(image_size=32, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4],
                 window_size=4, num_labels=3), "pixels", "vision"),
    HFModel("convnext", "ConvNextConfig", "ConvNextForImageClassification",
            dict(hidden_sizes=[32, 64], depths=[1, 1], num_stages=2, num_labels=3), "pixels", "vision"),
    HFModel("resnet", "ResNetConfig", "ResNetForImageClassification",
            dict(embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1], layer_type="basic",
                 num_labels=3), "pixels", "vision"),
    HFModel("clip", "CLIPConfig", "CLIPModel",
            dict(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=V,
                                  max_position_embeddings=16),
                 vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, image_size=32, patch_size=8),
                 projection_dim=32), "clip", "vision", include_output=True),
]

_REFUSED = "refused for a checkpoint, before anything is written (no config key holds the pruned widths)"
#: architectures that fail today: (exception class name, the precise reason)
XFAIL: dict[str, tuple[str, str]] = {
    "qwen2_moe": ("AssertionError", "transformers stores the experts converted (one 3-D tensor "
                  "live, one tensor per expert in the folder): `pruneplan apply` on the saved "
                  "folder is refused (names and shapes differ); apply_plan + save_pretrained works. "
                  "The experts' widths are not offered (3-D parameters, no Linear), and the router's "
                  "F.linear with its own weight leaves the hidden size out with that reason; "
                  "attention heads and the shared expert's MLP are pruned"),
    "qwen3_moe": ("AssertionError", "as qwen2_moe: experts stored converted, the folder is "
                  "refused; only the attention heads are pruned"),
    "bloom": ("AssertionError", "nothing a checkpoint can hold: its heads reach baddbmm with "
              "ALiBi biases (slopes computed from the head count, so heads are left out); the head "
              "size is hidden_size / n_head, so the hidden size stays with the heads; the MLP is 4 * "
              "hidden_size (no config key), so it follows the hidden size: 0% fewer parameters"),
    "swin": ("AssertionError", "its stage widths are embed_dim * 2**i (one key for every stage), "
             "its MLPs mlp_ratio * width and its head size width / num_heads[i]: no config "
             "change holds one stage pruned alone, so plan_from_metric keeps every group (0% fewer); "
             "apply_plan prunes the live model"),
}
MODELS = [replace(m, xfail=XFAIL.get(m.name)) for m in MODELS]
#: the real-suite subset (tests/test_hf_real.py): one of each construct that passes, about a
#: second each (GQA + RoPE, scaled tied embedding, q/k norms, fused MLP, Conv1D-free fused
#: qkv, learned positions, a sequence classifier, a derived head size, vision, a CNN)
REAL = ("llama", "qwen3", "gemma2", "phi3", "olmo2", "starcoder2", "granite", "opt", "gpt_neox",
        "gptj", "roberta", "deberta_v2", "whisper", "deit", "convnext", "resnet", "clip")
BY_NAME = {m.name: m for m in MODELS}


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def output(model: nn.Module, x: tuple) -> torch.Tensor:
    """The model's main output tensor: ``logits`` (``logits_per_image`` for CLIP)."""
    with torch.no_grad():
        out = model(*x)
    for key in ("logits", "logits_per_image"):
        if key in out and out[key] is not None:
            return out[key]
    raise AssertionError(f"no logits among {list(out.keys())}")


def spans_norm(group: Any, modules: dict[str, nn.Module]) -> bool:
    """Whether the group slices the weight of a norm over the channels (LayerNorm, RMSNorm,
    GroupNorm: removing a channel changes the statistics, so it is not zeroing it), or is the
    residual stream (it slices an embedding's columns: OLMo's norms have no weight)."""
    for s in group.slices:
        m = modules.get(s.tensor.rpartition(".")[0])
        if m is not None and any(n in type(m).__name__ for n in NORM_NAMES):
            return True
        if isinstance(m, nn.Embedding) and s.axis == 1:
            return True
    return False


def kind_of(group: Any, modules: dict[str, nn.Module]) -> str:
    """``heads``, ``query_groups``, ``hidden`` (a channels group slicing a norm: the residual
    stream), or ``channels`` (MLP widths, convolutions)."""
    if group.kind != "channels":
        return group.kind
    return "hidden" if spans_norm(group, modules) else "channels"


def zeroing_hooks(model: nn.Module, plan: Any) -> list:
    """Forward pre-hooks zeroing the plan's removed units at the input of every layer that reads
    them (a Linear's or convolution's input axis 1, Hugging Face Conv1D's axis 0)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    where: dict[str, set[int]] = {}
    for g in plan.groups:
        for s in g.slices:
            name, _, leaf = s.tensor.rpartition(".")
            m = modules[name]
            reads = leaf == "weight" and (
                (isinstance(m, nn.Linear) and s.axis == 1)
                or (isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) and m.groups == 1 and s.axis == 1)
                or (type(m).__name__ == "Conv1D" and s.axis == 0))
            if reads:
                for u in g.removed:
                    where.setdefault(name, set()).update(s.map.unit(u))
    handles = []
    for name, pos in where.items():
        m = modules[name]
        idx = torch.tensor(sorted(pos))
        dim = 1 if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) else -1

        def hook(_m: nn.Module, args: tuple, idx: torch.Tensor = idx, dim: int = dim) -> tuple:
            x = args[0].clone()
            x.index_fill_(dim if dim >= 0 else x.dim() - 1, idx, 0.0)
            return (x, *args[1:])

        handles.append(m.register_forward_pre_hook(hook))
    return handles


@dataclass
class Result:
    """What one architecture gave."""

    name: str
    status: str = "error"  # "pass", "low" (< 20% fewer parameters), "error"
    kinds: dict[str, int] = field(default_factory=dict)
    roots: int = 0
    left_out: list[Any] = field(default_factory=list)
    config: list[str] = field(default_factory=list)
    zeroing: str = ""
    before: int = 0
    after: int = 0
    seconds: float = 0.0
    error: str = ""

    @property
    def drop(self) -> float:
        return 1 - self.after / self.before if self.before else 0.0


def _clean_load(cls: Any, folder: Path) -> nn.Module:
    # mismatched sizes are reported below (by name) rather than raised by transformers
    loaded, info = cls.from_pretrained(folder, output_loading_info=True, ignore_mismatched_sizes=True)
    bad = {k: sorted(v)[:4] for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise AssertionError(f"from_pretrained({folder.name}) loading info: {bad} "
                             f"{info.get('error_msgs') or ''}".strip())
    return loaded.eval()


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 0.0) -> None:
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    if diff > tol * (1 + b.abs().max().item()):
        raise AssertionError(f"{what}: outputs differ by {diff:.3g}")


def check(spec: HFModel, workdir: Path | None = None,
          log: Callable[[str], None] | None = None, res: Result | None = None) -> Result:
    """Run the whole check (module docstring) on ``spec``; raise on the first thing that is
    wrong (AssertionError for a check, the library's error otherwise). Returns the numbers;
    ``res``, when given, is filled as the check goes (what was measured before a failure)."""
    from click.testing import CliRunner

    import pruneplan as pp
    from pruneplan.cli import cli

    t0 = time.perf_counter()
    res = Result(spec.name) if res is None else res
    model = spec.build()
    x = spec.example(model)
    res.before = params(model)
    y0 = output(model, x)
    modules = dict(model.named_modules(remove_duplicate=False))

    groups = pp.prunable_groups(model, x, include_output=spec.include_output)
    assert all(lo.reason.strip() for lo in groups.left_out), groups.left_out
    res.left_out = list(groups.left_out)
    res.roots = sum(len(g.roots) for g in groups) + len(groups.left_out)
    for g in groups:
        k = kind_of(g, modules)
        res.kinds[k] = res.kinds.get(k, 0) + 1

    # 2. zeroing: every group that spans no norm
    normed = [g.name for g in groups if spans_norm(g, modules)]
    if len(normed) < len(groups):
        plan_z = pp.plan_from_metric(model, x, "weight_norm", RATIOS, exclude=normed,
                                     include_output=spec.include_output)
        pruned = copy.deepcopy(model)
        pp.apply_plan(pruned, plan_z)
        handles = zeroing_hooks(model, plan_z)
        try:
            want = output(model, x)
        finally:
            for h in handles:
                h.remove()
        _close(output(pruned, x), want, "pruned vs zeroed", 1e-4)
        res.zeroing = f"{sum(len(g.removed) for g in plan_z.groups)} units of {len(plan_z.groups)} groups"
        del pruned
    else:
        res.zeroing = "no group without a norm"

    # 3. full plan, config, folders
    plan = pp.plan_from_metric(model, x, "weight_norm", RATIOS, include_output=spec.include_output)
    if plan.config is not None:
        problems = plan.config.problems()
        assert not problems, f"the config cannot hold the plan: {problems}"
        res.config = [f"{c.key} {c.before}->{c.after}" for c in plan.config.changes]
    with tempfile.TemporaryDirectory() if workdir is None else _nullcontext(workdir) as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp / "ckpt")
        plan.save(tmp / "plan.json")
        pp.apply_plan(model, plan)
        res.after = params(model)
        y1 = output(model, x)
        assert y1.shape == y0.shape, f"output shape {tuple(y1.shape)} != {tuple(y0.shape)}"
        model.save_pretrained(tmp / "saved")
        cls = type(model)
        _close(output(_clean_load(cls, tmp / "saved"), x), y1, "save_pretrained + from_pretrained", 1e-6)
        run = CliRunner().invoke(cli, ["apply", str(tmp / "plan.json"), str(tmp / "ckpt"),
                                       "-o", str(tmp / "out")])
        assert run.exit_code == 0, f"pruneplan apply: {run.output.strip()}"
        _close(output(_clean_load(cls, tmp / "out"), x), y1, "pruneplan apply + from_pretrained", 1e-6)
    res.seconds = time.perf_counter() - t0
    res.status = "pass" if res.drop >= MIN_PARAM_DROP else "low"
    if log:
        log(f"{spec.name}: {res.status}: {res.kinds}, {len(res.left_out)}/{res.roots} left out, "
            f"{res.before:,} -> {res.after:,} ({res.drop:.1%}), {res.seconds:.1f} s")
    return res


class _nullcontext:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __enter__(self) -> Any:
        return self.value

    def __exit__(self, *exc: object) -> None:
        return None
