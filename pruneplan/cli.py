"""The ``pruneplan`` command line: each command parses, calls one library function, prints."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click

import pruneplan
from pruneplan import PlanError, PrunePlan, json_schema

__all__ = ["cli", "main"]


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


def _default_output(weights: Path) -> Path:
    name = weights.name.removesuffix(".safetensors")
    return weights.with_name(f"{name}.pruned.safetensors")


@cli.command()
@click.argument("plan", type=click.Path(path_type=Path))
@click.argument("weights", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output file (default: <stem>.pruned.safetensors beside WEIGHTS).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--no-digest-check", is_flag=True,
              help="Only compare the shapes of the tensors the plan touches.")
def apply(plan: Path, weights: Path, output: Path | None, force: bool, no_digest_check: bool) -> None:
    """Prune the safetensors file WEIGHTS as PLAN says."""
    out = pruneplan.apply_to_safetensors(
        PrunePlan.load(plan), weights, output or _default_output(weights),
        overwrite=force, check_digest=not no_digest_check,
    )
    click.echo(f"wrote {out}")


@cli.command()
@click.argument("plan", type=click.Path(path_type=Path))
@click.argument("weights", type=click.Path(path_type=Path), required=False)
def validate(plan: Path, weights: Path | None) -> None:
    """Check PLAN, and that it fits the safetensors file WEIGHTS when given."""
    loaded = PrunePlan.load(plan)
    if weights is not None:
        pruneplan.check_weights(loaded, weights)
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


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
