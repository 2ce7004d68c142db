"""Benchmark: `pruneplan apply` on a ~2 GB sharded safetensors checkpoint vs a plain per-shard copy.

Prints, as ratios measured in the same run (median of --repeat runs, alternating):
  * peak RSS of the apply process / size of the largest shard                        target <= 1.5
    (also with the RSS of a bare interpreter that imported pruneplan subtracted)
  * time(pruneplan apply) / time(safetensors load_file + save_file of every shard, one at a time)

Usage: python benchmarks/apply_sharded.py [--size-mb 2048] [--shards 4] [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from apply_safetensors import IDLE, alternate, linear_chain, run_measured

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


def build(folder: Path, size_mb: int, shards: int) -> None:
    """A chain of square Linear layers of about ``size_mb`` MB (fp32) in ``shards`` shards, the
    Hugging Face index, and a plan removing 50% of every hidden layer's units."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    model, plan = linear_chain(size_mb, 2 * shards, gen)
    plan.save(folder / "plan.json")
    names = list(model.state_dict())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    per_shard = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):  # one shard in memory at a time
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: torch.randn(shapes[k], generator=gen) for k in names[i * per_shard : (i + 1) * per_shard]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(t.numel() * t.element_size() for t in part.values())
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=2048)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None, help="folder to keep the files in")
    ap.add_argument("--build", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build is not None:
        build(args.build, args.size_mb, args.shards)
        return
    root = args.keep or Path(tempfile.mkdtemp(prefix="pruneplan-bench-"))
    ckpt = root / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    # Build in a child process: a forked child's peak RSS counts the parent's pages, so the
    # parent stays small (no torch import, no tensors).
    subprocess.run([sys.executable, __file__, "--build", str(ckpt), "--size-mb", str(args.size_mb),
                    "--shards", str(args.shards)], check=True)
    plan_path = ckpt / "plan.json"
    out, copy_out = root / "pruned", root / "copy"
    exe = [sys.executable, "-m", "pruneplan.cli"]
    (ta, ra), (tc, rc) = alternate([[*exe, "apply", str(plan_path), str(ckpt), "-o", str(out), "--force"],
                                    [sys.executable, "-c", COPY, str(ckpt), str(copy_out)]], args.repeat)
    _, idle_rss = run_measured([sys.executable, "-c", IDLE])
    shard_sizes = [p.stat().st_size for p in ckpt.glob("model-*.safetensors")]
    largest = max(shard_sizes)
    mb = 2**20
    print(f"checkpoint: {sum(shard_sizes) / mb:.0f} MB in {len(shard_sizes)} shards (largest {largest / mb:.0f} MB), "
          f"{folder_size(out) / mb:.0f} MB out")
    print(f"apply: {ta:.2f} s   plain per-shard safetensors copy: {tc:.2f} s   ratio {ta / tc:.2f}")
    print(f"peak RSS: apply {ra / mb:.0f} MB, copy {rc / mb:.0f} MB, "
          f"bare interpreter with imports {idle_rss / mb:.0f} MB")
    print(f"apply RSS / largest shard: {ra / largest:.2f} with the interpreter, "
          f"{(ra - idle_rss) / largest:.2f} without (target <= 1.5); copy: {rc / largest:.2f}")
    if args.keep is None:
        for folder in (ckpt, out, copy_out):
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()
        root.rmdir()


if __name__ == "__main__":
    main()
