"""Benchmark: `pruneplan apply` on a ~1 GB sharded safetensors checkpoint vs a plain per-shard copy.

The checkpoint is a chain of square Linear layers (default 16 x 4096x4096 fp32 = 1 GB, in 4
shards of 256 MB, with the Hugging Face index); the same three plans as apply_safetensors.py
(every other unit, a random half, one contiguous block of each layer but the last).

For each plan prints, as ratios measured in the same run (alternating, --repeat rounds, medians):
  * time(pruneplan apply) / time(safetensors load_file + save_file of every shard, one at a
    time)                                                                          target <= 1.0
  * peak RSS of the apply process / (output size + largest tensor)    target <= 1.3 + interpreter
    (also without the interpreter; and the peak RSS / largest shard)
Then the wall time of `pruneplan show` on a plan of a ResNet-50 (see plan_commands.py).

Usage: python benchmarks/apply_sharded.py [--size-mb 1024] [--width 4096] [--shards 4] [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from apply_safetensors import IDLE, PATTERNS, alternate, linear_chain, report, run_measured

INDEX = "model.safetensors.index.json"
COPY = """
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(exist_ok=True)
for shard in sorted(src.glob("model-*.safetensors")):
    save_file(load_file(str(shard)), str(dst / shard.name), metadata={"format": "pt"})
"""


def build(folder: Path, size_mb: int, width: int, shards: int) -> None:
    """The checkpoint in ``shards`` shards with its index, one plan per pattern, the largest tensor."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    model, plans = linear_chain(size_mb, width, 2 * shards, gen)
    for name, plan in plans.items():
        plan.save(folder.parent / f"{name}.json")
    names = list(model.state_dict())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    per_shard = -(-len(names) // shards)
    weight_map, total, largest = {}, 0, 0
    for i in range(shards):  # one shard in memory at a time
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: torch.randn(shapes[k], generator=gen) for k in names[i * per_shard : (i + 1) * per_shard]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(t.numel() * t.element_size() for t in part.values())
        largest = max(largest, *(t.numel() * t.element_size() for t in part.values()))
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (folder.parent / "largest").write_text(str(largest))


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None, help="folder to keep the files in")
    ap.add_argument("--build", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build is not None:
        build(args.build, args.size_mb, args.width, args.shards)
        return
    root = args.keep or Path(tempfile.mkdtemp(prefix="pruneplan-bench-"))
    ckpt = root / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    try:
        # Build in a child process: a forked child's peak RSS counts the parent's pages, so the
        # parent stays small (no torch import, no tensors).
        subprocess.run([sys.executable, __file__, "--build", str(ckpt), "--size-mb", str(args.size_mb),
                        "--width", str(args.width), "--shards", str(args.shards)], check=True)
        largest = int((root / "largest").read_text())
        exe = [sys.executable, "-m", "pruneplan.cli"]
        commands: dict[str, list[str]] = {}
        for p in PATTERNS:
            commands[p] = [*exe, "apply", str(root / f"{p}.json"), str(ckpt), "-o", str(root / f"pruned-{p}"),
                           "--force"]
            commands[f"copy-after-{p}"] = [sys.executable, "-c", COPY, str(ckpt), str(root / "copy")]
        raw = alternate(commands, args.repeat)
        results = {p: raw[p] for p in PATTERNS}
        copies = [raw[f"copy-after-{p}"] for p in PATTERNS]
        results["copy"] = tuple(statistics.median(c[i] for c in copies) for i in range(3))
        _, _, idle_rss = run_measured([sys.executable, "-c", IDLE])
        shard_sizes = [p.stat().st_size for p in ckpt.glob("model-*.safetensors")]
        mb = 2**20
        print(f"checkpoint: {sum(shard_sizes) / mb:.0f} MB in {len(shard_sizes)} shards (largest "
              f"{max(shard_sizes) / mb:.0f} MB), {args.width}x{args.width} fp32 Linear layers, largest tensor "
              f"{largest / mb:.0f} MB; median of {args.repeat} alternating rounds")
        sizes = {p: folder_size(root / f"pruned-{p}") for p in PATTERNS}
        report(results, "copy", sizes, largest, idle_rss)
        print("peak RSS / largest shard: " + ", ".join(
            f"{p} {results[p][2] / max(shard_sizes):.2f}" for p in PATTERNS)
            + f"; copy {results['copy'][2] / max(shard_sizes):.2f}")
        from plan_commands import show_time

        print(show_time(root, 5))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
