"""A small Llama-style language model, trained on Python's own source, pruned to about half.

1. Text: the ``.py`` files of the standard library of the running interpreter (they ship with
   Python), read as bytes (vocabulary 256, no tokenizer needed); every 10th file is held out.
2. Model: ``LlamaForCausalLM`` built from a config (hidden 256, 4 layers, 8 query heads and 4
   key/value heads of 32, MLP 768, tied embeddings: about 3M parameters), trained for
   ``--minutes`` on the CPU.
3. Plan: Taylor scores from a few training batches with the built-in causal-LM criterion,
   selection per group kind (query groups, MLP channels, hidden size) with the same count in
   every layer, so the Hugging Face config can say what was pruned; about half of the
   parameters go.
4. Perplexity (per byte) on the held-out files: before, right after pruning, and after a short
   fine-tune.
5. The saved checkpoint folder is pruned by the CLI alone (``pruneplan apply plan.json ckpt -o
   pruned``) and loaded back with ``AutoModelForCausalLM.from_pretrained``: its logits equal
   those of the live pruned model.

Run: ``python examples/llm.py [--minutes 3] [--out runs/llm]``; ``--quick`` runs a few steps (the
test does).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pruneplan as pp

SEQ = 128


def corpus(limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(training bytes, held-out bytes) from the standard library's sources, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    train, held = bytearray(), bytearray()
    for i, path in enumerate(files):
        data = path.read_bytes()
        (held if i % 10 == 9 else train).extend(data)
        if limit is not None and len(train) >= limit and len(held) >= limit // 8:
            break
    return torch.tensor(list(train), dtype=torch.long), torch.tensor(list(held), dtype=torch.long)


def build():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=SEQ,
        tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def batches(data: torch.Tensor, batch: int, gen: torch.Generator):
    """Endless random windows of SEQ bytes."""
    while True:
        start = torch.randint(0, len(data) - SEQ, (batch,), generator=gen)
        yield torch.stack([data[s:s + SEQ] for s in start.tolist()])


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))


def train(model, data: torch.Tensor, seconds: float, max_steps: int, lr: float, seed: int) -> int:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    t0, step = time.perf_counter(), 0
    for ids in batches(data, 16, gen):
        loss = loss_of(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step >= max_steps or time.perf_counter() - t0 > seconds:
            break
    model.eval()
    return step


@torch.no_grad()
def perplexity(model, data: torch.Tensor, windows: int) -> float:
    """exp(mean next-byte cross-entropy) over ``windows`` consecutive windows of the held-out text."""
    model.eval()
    n = min(windows, len(data) // SEQ)
    ids = data[: n * SEQ].view(n, SEQ)
    losses = [loss_of(model, ids[i:i + 16]).item() * len(ids[i:i + 16]) for i in range(0, n, 16)]
    return math.exp(sum(losses) / n)


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=Path("runs/llm"))
    ap.add_argument("--quick", action="store_true", help="a few steps on a little text (tests)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    quick = args.quick
    train_data, held = corpus(200_000 if quick else None)
    model = build()
    total = count(model)
    seconds = 1e9 if quick else args.minutes * 60
    steps = train(model, train_data, seconds, 8 if quick else 10**9, 3e-3, seed=1)
    windows = 16 if quick else 256
    ppl = {"trained": perplexity(model, held, windows)}
    print(f"model: {total / 1e6:.2f}M parameters, {len(train_data) / 1e6:.1f} MB of training "
          f"text, {steps} steps; held-out perplexity per byte {ppl['trained']:.3f}")

    # plan: Taylor scores on a few batches, per-kind ratios, same count in every layer
    gen = torch.Generator().manual_seed(2)
    data = [(ids, ids) for ids, _ in zip(batches(train_data, 8, gen), range(2 if quick else 8))]
    example = data[0][0]
    plan = pp.plan_from_metric(
        model, example, "taylor", 0.3, kind_ratios={"query_groups": 0.25},
        # hidden 256 -> 192: a multiple of the 6 query heads that stay (transformers checks it)
        layer_ratios={"model.embed_tokens": 0.25}, data=data, criterion="causal_lm")
    args.out.mkdir(parents=True, exist_ok=True)
    plan.save(args.out / "plan.json")
    ckpt = args.out / "checkpoint"
    model.save_pretrained(ckpt)

    pp.apply_plan(model, plan)
    kept = count(model)
    ppl["pruned"] = perplexity(model, held, windows)
    c = model.config
    print(f"pruned: {kept / 1e6:.2f}M parameters ({kept / total:.0%}); hidden {c.hidden_size}, "
          f"MLP {c.intermediate_size}, {c.num_attention_heads} query heads, "
          f"{c.num_key_value_heads} key/value heads; perplexity {ppl['pruned']:.3f}")

    # the checkpoint folder, pruned with no model code, loads back with the same logits
    pruned_dir = args.out / "pruned"
    subprocess.run([sys.executable, "-m", "pruneplan.cli", "apply", str(args.out / "plan.json"),
                    str(ckpt), "-o", str(pruned_dir), "--force"], check=True)
    loaded = AutoModelForCausalLM.from_pretrained(pruned_dir).eval()
    with torch.no_grad():
        same = torch.equal(loaded(input_ids=example).logits, model(input_ids=example).logits)
    print(f"CLI-pruned checkpoint loaded with from_pretrained: logits equal to the live model: {same}")

    steps_ft = train(model, train_data, seconds / 3, 4 if quick else 10**9, 1e-3, seed=3)
    ppl["fine_tuned"] = perplexity(model, held, windows)
    print(f"fine-tuned {steps_ft} steps: perplexity {ppl['fine_tuned']:.3f}")
    summary = {"parameters": total, "parameters_pruned": kept, "steps": steps,
               "steps_fine_tune": steps_ft, "perplexity": ppl, "checkpoint_logits_equal": same,
               "config": {k: getattr(c, k) for k in ("hidden_size", "intermediate_size",
                                                       "num_attention_heads", "num_key_value_heads",
                                                       "head_dim")}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if not same:
        raise SystemExit("the checkpoint pruned by the CLI does not reproduce the live model")


if __name__ == "__main__":
    main()
