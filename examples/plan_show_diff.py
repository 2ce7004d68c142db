"""Generate a plan, review it with ``pruneplan show``, change the ratio and ``pruneplan diff``.

1. Train the digits CNN and build a plan with `pruneplan.plan_from_metric` (Taylor scores on a
   few hundred examples, 30% of every prunable group), save it as JSON.
2. ``pruneplan show plan_30.json``: one row per group (kept/size, % removed, parameters removed).
3. Build the same plan again: the file is byte-identical (same inputs -> same plan), and
   ``pruneplan diff`` of the two exits 0.
4. Build a plan at ratio 0.5 and ``pruneplan diff plan_30.json plan_50.json``: per group, the
   indices only in A (``-[...]``) and only in B (``+[...]``); exit status 1 because the plans
   differ, like diff(1). The same comparison in Python: `pruneplan.diff_plans`.

Outputs under --out: plan_30.json, plan_30_again.json, plan_50.json, show.txt, diff.txt.

Usage: python examples/plan_show_diff.py [--out out/plan_show_diff] [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import example_parser, load_data, make_cnn, run_cli, start_example, train

import pruneplan as pp


def main() -> None:
    ap = example_parser(__doc__, "plan_show_diff")
    args = ap.parse_args()
    started = time.perf_counter()
    out = start_example(args.out)

    data = load_data()
    model = make_cnn()
    epochs, n_attr = (1, 64) if args.quick else (8, 256)
    train(model, data, epochs)
    batches = list(data.batches(64, seed=99, limit=n_attr))
    x = data.x_test[:2]

    def make(ratio: float, name: str) -> pp.PrunePlan:
        plan = pp.plan_from_metric(model, x, "taylor", ratio, data=batches, criterion="cross_entropy")
        path = plan.save(out / name)
        print(f"wrote {path.name}: ratio {ratio}, {len(plan.groups)} groups, "
              f"{plan.parameters_removed():,} parameters removed, digest {plan.digest()[:12]}")
        return plan

    print("1. a plan from Taylor scores, 30% of every group")
    p30 = make(0.3, "plan_30.json")

    print("\n2. review it")
    shown = run_cli("show", str(out / "plan_30.json"), check=False)
    (out / "show.txt").write_text(shown.stdout)
    print(f"exit status {shown.returncode}")

    print("\n3. the same inputs give the same plan, byte for byte")
    make(0.3, "plan_30_again.json")
    identical = (out / "plan_30.json").read_bytes() == (out / "plan_30_again.json").read_bytes()
    print(f"plan_30.json and plan_30_again.json byte-identical: {identical}")
    same = run_cli("diff", str(out / "plan_30.json"), str(out / "plan_30_again.json"), check=False)
    print(f"exit status {same.returncode} (0: nothing differs)")

    print("\n4. a larger ratio, and what changes")
    p50 = make(0.5, "plan_50.json")
    differ = run_cli("diff", str(out / "plan_30.json"), str(out / "plan_50.json"), check=False)
    (out / "diff.txt").write_text(differ.stdout)
    print(f"exit status {differ.returncode} (1: the plans differ, like diff(1)); '-[...]' are "
          "indices only plan_30 removes, '+[...]' indices only plan_50 removes")

    d = pp.diff_plans(p30, p50)
    print("\nthe same in Python, pruneplan.diff_plans(p30, p50):")
    for g in d:
        print(f"  group {g.name}: {len(p30.group(g.name).removed)} -> {len(p50.group(g.name).removed)} "
              f"removed of {g.size_a}; {len(g.only_in_a)} only in 0.3, {len(g.only_in_b)} only in 0.5")
    nested = all(not g.only_in_a for g in d)
    print(f"every unit the 0.3 plan removes is also removed at 0.5 (same scores, lowest first): {nested}")

    if not (identical and same.returncode == 0 and differ.returncode == 1 and shown.returncode == 0):
        raise SystemExit("unexpected result, see above")
    print(f"\noutputs in {out.resolve()}: plan_30.json, plan_30_again.json, plan_50.json, show.txt, "
          f"diff.txt ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
