"""Benchmark: pruneplan on a Llama-style model of about 100M parameters built from a config.

Every ratio is measured in the same run (median of ``--reps`` repetitions):

1. discovery + planning (``plan_pruning`` with 25% of every head, query-group, MLP and hidden
   group's units, which traces the model once) / one forward pass on the same batch
   (target <= 2);
2. Taylor ``run_all`` over the roots of every head/query-group and MLP group (q_proj and
   gate_proj of every layer, one batch) / one forward+backward pass on that batch
   (target <= 1.5);
3. ``pruneplan apply PLAN CHECKPOINT_DIR -o OUT`` on the model's sharded checkpoint
   (``save_pretrained`` with 100 MB shards) / a plain per-shard copy (safetensors
   ``load_file`` + ``save_file`` of every shard, one at a time, in a fresh interpreter like
   the CLI) (target <= 1.0).

The model: hidden 768, 12 layers, 12 query heads and 4 key/value heads of 64, MLP 2048,
vocabulary 16000, lm_head tied to the embedding (87.8M parameters; ``--untied``: its own lm_head,
100.1M), random weights, fp32 on the CPU; the batch is 1 x ``--tokens`` token ids. With the tie,
the checkpoint stores the embedding once and the plan records ``lm_head.weight`` as tied: the
apply checks that both are sliced alike, and the content digest of the folder equals the
model's (no content warning).

Run: ``python benchmarks/transformers.py [--reps 3] [--tokens 256] [--untied]`` (needs
``transformers``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# this file's name shadows the transformers package: take its folder off the import path and
# load the sibling helper by path
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
_spec = importlib.util.spec_from_file_location("apply_safetensors", _HERE / "apply_safetensors.py")
_helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helper)
alternate = _helper.alternate

import pruneplan  # noqa: E402
from pruneplan.attributions import TaylorAttributionMetric  # noqa: E402
from pruneplan.graph.discover import prunable_groups  # noqa: E402

COPY = """
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(exist_ok=True)
for shard in sorted(src.glob("model-*.safetensors")):
    save_file(load_file(str(shard)), str(dst / shard.name), metadata={"format": "pt"})
"""


def build(tied: bool = True) -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, vocab_size=16000, tie_word_embeddings=tied,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


class Logits(nn.Module):
    """The logits alone (what a criterion of (output, target) reads)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


def next_token(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Causal-LM loss: token t predicts token t + 1 (``reduction="none"``: per token)."""
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction=reduction)
    return loss


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--untied", action="store_true", help="an lm_head of its own")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build(tied=not args.untied)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 16000, (1, args.tokens), generator=torch.Generator().manual_seed(1))

    # 1. discovery + planning / one forward pass
    groups = prunable_groups(model, (ids,))
    removed = {g.name: list(range(0, g.size, 4)) for g in groups}  # 25% of every group
    kinds = sorted({g.kind for g in groups})

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    forward()  # warm-up
    t_fwd = timed(forward, args.reps)
    plan = None

    def planning() -> None:
        nonlocal plan
        plan = pruneplan.plan_pruning(model, removed, example_inputs=(ids,))

    t_plan = timed(planning, args.reps)
    print(f"model: {params / 1e6:.1f}M parameters ({'untied' if args.untied else 'tied'} lm_head), "
          f"{len(groups)} groups ({', '.join(kinds)}), batch 1 x {args.tokens} tokens")
    print(f"1. discovery + planning {t_plan:.3f} s / forward {t_fwd:.3f} s = "
          f"{t_plan / t_fwd:.2f} (target <= 2)")

    # 2. Taylor run_all over head and MLP groups / one forward+backward
    wrapped = Logits(model)
    roots = [g.name for g in groups if g.kind in ("heads", "query_groups")] + \
            [g.name for g in groups if g.name.endswith("mlp.gate_proj")]

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        next_token(wrapped(ids), ids).backward()

    fwd_bwd()
    t_fb = timed(fwd_bwd, args.reps)
    model.zero_grad(set_to_none=True)
    taylor = TaylorAttributionMetric(wrapped, [(ids, ids)], next_token, "cpu")
    t_taylor = timed(lambda: taylor.run_all([f"model.{r}" for r in roots]), args.reps)
    print(f"2. Taylor run_all over {len(roots)} head/MLP roots {t_taylor:.3f} s / forward+backward "
          f"{t_fb:.3f} s = {t_taylor / t_fb:.2f} (target <= 1.5)")

    # 3. pruneplan apply on the sharded checkpoint / plain per-shard copy
    with tempfile.TemporaryDirectory(prefix="pruneplan-bench-") as tmp:
        root = Path(tmp)
        ckpt = root / "checkpoint"
        model.save_pretrained(ckpt, max_shard_size="100MB", safe_serialization=True)
        plan.save(root / "plan.json")
        shards = sorted(ckpt.glob("model-*.safetensors"))
        size = sum(p.stat().st_size for p in shards)
        if plan.config is not None and plan.config.tied:
            print(f"   tied in the plan: {plan.config.tied}; content digest of the folder equals the "
                  f"model's: {pruneplan.weights_digest(ckpt) == pruneplan.weights_digest(model)}")
        exe = [sys.executable, "-m", "pruneplan.cli"]
        got = alternate(
            {"apply": [*exe, "apply", str(root / "plan.json"), str(ckpt), "-o", str(root / "pruned"),
                       "--force"],
             "copy": [sys.executable, "-c", COPY, str(ckpt), str(root / "copy")]}, args.reps)
        (t_apply, c_apply, _), (t_copy, c_copy, _) = got["apply"], got["copy"]
        print(f"3. pruneplan apply {t_apply:.2f} s / per-shard copy {t_copy:.2f} s = "
              f"{t_apply / t_copy:.2f} (target <= 1.0; {len(shards)} shards, {size / 2**20:.0f} MB); "
              f"CPU {c_apply:.2f} / {c_copy:.2f} s = {c_apply / c_copy:.2f}")


if __name__ == "__main__":
    main()
