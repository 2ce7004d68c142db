"""The ``pruneplan`` command line: each command parses, calls one library function, prints."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click

import pruneplan
from pruneplan import PlanError, PrunePlan, json_schema

# torch and numpy are imported only by the commands that need them (`apply`, `validate PLAN
# WEIGHTS`, `groups`, `plan`): reviewing a plan (`show`, `diff`, `validate PLAN`, `schema`) starts
# in a fraction of a second. `pruneplan.loading` (torch) is imported inside those commands.

__all__ = ["cli", "main"]


class _LoadingChoice(click.Choice):
    """A `click.Choice` over the keys of a table of `pruneplan.loading` (``"METRICS"``...), read
    only when the option is parsed or its help shown, so that defining it imports no torch."""

    def __init__(self, table: str) -> None:
        self._table = table
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        from pruneplan import loading

        return tuple(sorted(getattr(loading, self._table)))

    @choices.setter
    def choices(self, value: object) -> None:  # click.Choice.__init__ assigns it; the table wins
        pass


class _Cli(click.Group):
    """Turns every `PlanError` into one ``error: ...`` line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PlanError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Cli)
@click.version_option(pruneplan.__version__, prog_name="pruneplan")
def cli() -> None:
    """Plan, inspect and apply structured pruning of PyTorch models."""


def _sharded(weights: Path) -> bool:
    return weights.is_dir() or weights.name.endswith(".index.json")


def _default_output(weights: Path) -> Path:
    if _sharded(weights):
        folder = weights if weights.is_dir() else weights.parent
        folder = folder.resolve() if folder.name in ("", "..") else folder
        return folder.with_name(f"{folder.name}.pruned")
    name = weights.name.removesuffix(".safetensors")
    return weights.with_name(f"{name}.pruned.safetensors")


@cli.command()
@click.argument("plan", type=click.Path(path_type=Path))
@click.argument("weights", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output file (default: <stem>.pruned.safetensors beside WEIGHTS); for a sharded "
                   "checkpoint, the output folder (default: <folder>.pruned beside the checkpoint "
                   "folder).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--no-digest-check", is_flag=True,
              help="Only compare the shapes of the tensors the plan touches.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
def apply(plan: Path, weights: Path, output: Path | None, force: bool, no_digest_check: bool,
          progress: bool | None) -> None:
    """Prune WEIGHTS as PLAN says.

    WEIGHTS is a safetensors file, or a sharded checkpoint: its folder (holding one
    *.safetensors.index.json) or its index file. A sharded checkpoint is pruned shard by shard
    into a new folder holding the pruned shards and index only (no config or other files).
    """
    apply_to = pruneplan.apply_to_sharded_safetensors if _sharded(weights) else pruneplan.apply_to_safetensors
    out = apply_to(
        PrunePlan.load(plan), weights, output or _default_output(weights),
        overwrite=force, check_digest=not no_digest_check,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    click.echo(f"wrote {out}")


@cli.command()
@click.argument("plan", type=click.Path(path_type=Path))
@click.argument("weights", type=click.Path(path_type=Path), required=False)
def validate(plan: Path, weights: Path | None) -> None:
    """Check PLAN, and that it fits WEIGHTS when given.

    WEIGHTS is a safetensors file, or a sharded checkpoint (its folder or its
    *.safetensors.index.json); for a sharded checkpoint the index and every shard header are
    checked against each other too.
    """
    loaded = PrunePlan.load(plan)
    if weights is not None:
        check = pruneplan.check_sharded_weights if _sharded(weights) else pruneplan.check_weights
        check(loaded, weights)
    fits = f"; fits {weights}" if weights is not None else ""
    click.echo(f"ok: {len(loaded.groups)} groups, digest {loaded.digest()}{fits}")


@cli.command()
@click.argument("plan", type=click.Path(path_type=Path))
def show(plan: Path) -> None:
    """Print a table of PLAN's groups: kept/size, % removed, parameters removed."""
    loaded = PrunePlan.load(plan)
    rows = loaded.summary()
    width = max([len("group"), *(len(r["group"]) for r in rows)])
    click.echo(f"{'group':<{width}}  {'kept/size':>11}  {'removed':>8}  {'parameters':>12}")
    for r in rows:
        kept = f"{r['kept']}/{r['size']}"
        click.echo(f"{r['group']:<{width}}  {kept:>11}  {r['fraction']:>8.1%}  {r['parameters']:>12,}")
    total = sum(math.prod(s) for s in loaded.model.tensors.values())
    removed = loaded.parameters_removed()
    click.echo(
        f"{len(rows)} groups; {removed:,} of {total:,} parameters in touched tensors removed "
        f"({removed / max(total, 1):.1%}); digest {loaded.digest()[:12]}"
    )


@cli.command()
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
def diff(a: Path, b: Path) -> None:
    """Compare two plans group by group; exit 1 when they differ (like diff(1))."""
    result = pruneplan.diff_plans(PrunePlan.load(a), PrunePlan.load(b))
    if not result:
        click.echo("plans are identical in what they prune")
        return
    if result.model_differs:
        click.echo("model fingerprints differ")
    for g in result:
        if g.size_a is None:
            click.echo(f"{g.name}: only in B (removes {len(g.only_in_b)})")
        elif g.size_b is None:
            click.echo(f"{g.name}: only in A (removes {len(g.only_in_a)})")
        else:
            parts = [f"-{g.only_in_a}" if g.only_in_a else "", f"+{g.only_in_b}" if g.only_in_b else ""]
            extra = " (structure differs)" if g.structure_differs else ""
            click.echo(f"{g.name}: " + " ".join(p for p in parts if p) + extra)
    sys.exit(1)


@cli.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Write to this file instead of standard output.")
def schema(output: Path | None) -> None:
    """Print the JSON Schema of the plan format."""
    text = json_schema()
    if output is None:
        click.echo(text, nl=False)
    else:
        with click.open_file(str(output), "w", encoding="utf-8", atomic=True) as fh:
            fh.write(text)
        click.echo(f"wrote {output}")


_MODEL = click.option("--model", "model_spec", required=True,
                      help="Model factory as pkg.module:factory (or file.py:factory).")
_SHAPE = click.option("--input-shape", required=True, help="One example's shape, e.g. 3,224,224.")
_DTYPE = click.option("--input-dtype", type=click.Choice(["float32", "long"]), default="float32",
                      show_default=True, help="Example input dtype (long for token ids).")
_WEIGHTS = click.option("--weights", type=click.Path(path_type=Path), default=None,
                        help="Load these weights (safetensors) into the model first.")


def _example(shape: str, dtype: str):
    import torch

    from pruneplan import loading

    return loading.example_input(loading.parse_input_shape(shape), batch_size=2,
                                 dtype=torch.long if dtype == "long" else torch.float32)


@cli.command()
@_MODEL
@_WEIGHTS
@_SHAPE
@_DTYPE
def groups(model_spec: str, weights: Path | None, input_shape: str, input_dtype: str) -> None:
    """List the prunable groups that automatic discovery finds in a model."""
    from pruneplan import loading

    model = loading.load_model(model_spec, weights)
    found = pruneplan.prunable_groups(model, _example(input_shape, input_dtype))
    click.echo(pruneplan.describe_groups(found))


@cli.command()
@_MODEL
@_WEIGHTS
@_SHAPE
@_DTYPE
@click.option("--metric", type=_LoadingChoice("METRICS"), required=True)
@click.option("--ratio", type=float, required=True, help="Fraction of units to remove.")
@click.option("--scope", type=click.Choice(["layer", "global"]), default="layer", show_default=True)
@click.option("--round-to", type=int, default=1, show_default=True, help="Keep multiples of this many units.")
@click.option("--min-keep", type=int, default=1, show_default=True)
@click.option("--data", "data_spec", default=None,
              help="Data factory pkg.module:loader_factory returning (x, y) batches.")
@click.option("--criterion", type=_LoadingChoice("CRITERIA"), default="cross_entropy",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Plan file to write.")
def plan(model_spec: str, weights: Path | None, input_shape: str, input_dtype: str, metric: str,
         ratio: float, scope: str, round_to: int, min_keep: int, data_spec: str | None, criterion: str,
         seed: int, output: Path) -> None:
    """Score a model's units with a metric and write the plan that removes RATIO of them."""
    from pruneplan import loading

    if loading.metric_needs_data(metric) and data_spec is None:
        raise click.UsageError(f"metric {metric!r} needs --data")
    model = loading.load_model(model_spec, weights)
    data = loading.load_factory(data_spec)() if data_spec else None
    made = pruneplan.plan_from_metric(
        model, _example(input_shape, input_dtype), metric, ratio, scope=scope, round_to=round_to,
        min_keep=min_keep, data=data, criterion=criterion, seed=seed,
    )
    made.save(output)
    click.echo(f"wrote {output}: {len(made.groups)} groups, {made.parameters_removed():,} parameters "
               f"removed, digest {made.digest()[:12]}")


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
