"""The ``pruneplan`` command line: each command parses, calls one library function, prints."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
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


_DEBUG = "pruneplan.debug"


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


class _Cli(click.Group):
    """The one place where errors and warnings become output.

    A `PlanError` (bad input) prints one ``error: ...`` line, in the CLI's words where the error
    carries them (``cli_message``), and exits 1; so does an `OSError` on a path the user named.
    Any other exception (one nobody anticipated) prints one ``error:`` line with its type and a
    ``hint:`` line, and exits 1; ``pruneplan --debug ...`` (or ``PRUNEPLAN_DEBUG=1``) shows its
    traceback too. click's usage errors keep exit 2. Library warnings (logged or
    `warnings.warn`-ed) become ``warning: ...`` lines on stderr.
    """

    def invoke(self, ctx: click.Context):
        handler = _WarningLines()
        lib = logging.getLogger("pruneplan")
        lib.addHandler(handler)
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except PlanError as exc:
            click.echo(f"error: {_one_line(exc.cli_message or str(exc))}", err=True)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or _one_line(str(exc))}", err=True)
        except Exception as exc:
            debug = ctx.meta.get(_DEBUG) or os.environ.get("PRUNEPLAN_DEBUG")
            if debug:
                traceback.print_exc()
            click.echo(f"error: unexpected {type(exc).__name__}: {_one_line(str(exc))[:500]}", err=True)
            if not debug:
                click.echo("hint: run `pruneplan --debug ...` to see the traceback; if the input looks "
                           "right, this is a bug in pruneplan: please report it", err=True)
        finally:
            lib.removeHandler(handler)
        ctx.exit(1)


class _WarningLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"warning: {record.getMessage()}", err=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


_CONTENT = click.option(
    "--content-check", type=click.Choice(["warn", "error", "off"]), default="warn", show_default=True,
    help="When the plan records the content digest of the weights it scored and WEIGHTS differ: "
         "warn, fail (exit 1), or skip the check (and the hashing).")


class _Shape(click.ParamType):
    """``3,224,224`` (or ``3x224x224``) -> (3, 224, 224): positive integers, a usage error else."""

    name = "shape"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = [p.strip() for p in str(value).replace("x", ",").split(",")]
        if not all(p.isdigit() and int(p) > 0 for p in parts):
            self.fail(f"{value!r} is not a shape: give positive integers separated by commas, e.g. "
                      "3,224,224", param, ctx)
        return tuple(int(p) for p in parts)


@click.group(cls=_Cli)
@click.version_option(pruneplan.__version__, prog_name="pruneplan")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Plan, inspect and apply structured pruning of PyTorch models."""
    ctx.meta[_DEBUG] = debug


@contextlib.contextmanager
def _about(option: str, value: object) -> Iterator[None]:
    """Errors of the block are about ``option``: their CLI message starts with it."""
    try:
        yield
    except PlanError as exc:
        text = exc.cli_message or str(exc)
        text = text.removeprefix(f"{str(value)!r}: ").removeprefix(f"{value}: ")
        exc.cli_message = f"{option} {value}: {text}"
        raise


def _output_path(raw: str | None) -> tuple[Path | None, bool]:
    """``-o`` as given: the path, and whether it names a folder (a trailing slash)."""
    if raw is None:
        return None, False
    return Path(raw), raw.endswith(("/", os.sep))


def _file_output(raw: str) -> Path:
    """A ``-o`` that must name a file: a trailing slash (a folder) is a usage error."""
    path, folder = _output_path(raw)
    if folder or (path is not None and path.is_dir()):
        raise click.BadParameter(f"{raw!r} is a folder; give a file name", param_hint="'-o' / '--output'")
    return path


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
@click.option("-o", "--output", default=None,
              help="Output file (default: <stem>.pruned.safetensors beside WEIGHTS; with a trailing "
                   "'/', that name in the folder OUTPUT); for a sharded checkpoint, the output "
                   "folder (default: <folder>.pruned beside the checkpoint folder).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--no-digest-check", is_flag=True,
              help="Only compare the shapes of the tensors the plan touches.")
@_CONTENT
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
def apply(plan: Path, weights: Path, output: str | None, force: bool, no_digest_check: bool,
          content_check: str, progress: bool | None) -> None:
    """Prune WEIGHTS as PLAN says.

    WEIGHTS is a safetensors file, or a sharded checkpoint: its folder (holding one
    *.safetensors.index.json) or its index file. A sharded checkpoint is pruned shard by shard
    into a new folder holding the pruned shards and index only. A Hugging Face checkpoint folder
    (one holding config.json, with sharded or single-file safetensors weights; or its index)
    becomes a folder with the pruned weights, the rewritten config.json and a copy of the other files; a plan
    whose widths the config cannot express is refused before anything is written.
    """
    ckpt = weights.parent if weights.name.endswith(".index.json") else weights
    if pruneplan.is_hf_checkpoint(ckpt):
        apply_to, weights = pruneplan.apply_to_checkpoint, ckpt
    elif _sharded(weights):
        apply_to = pruneplan.apply_to_sharded_safetensors
    else:
        apply_to = pruneplan.apply_to_safetensors
    target, folder = _output_path(output)
    if target is None:
        target = _default_output(weights)
    elif folder and not _sharded(weights):  # `-o dir/`: the default name, in that folder
        target = target / _default_output(weights).name
    # the plan is an input too (the appliers see only the weights): never replaced or deleted;
    # the rest of the rule (exists, a folder...) the applier checks, in its own words
    if _sharded(weights) or not target.is_dir():
        pruneplan.check_output(target, [plan], overwrite=force or not _sharded(weights),
                               folder=_sharded(weights))
    out = apply_to(
        PrunePlan.load(plan), weights, target,
        overwrite=force, check_digest=not no_digest_check, check_content=content_check,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    click.echo(f"wrote {out}")


@cli.command()
@click.argument("plan", type=click.Path(path_type=Path))
@click.argument("weights", type=click.Path(path_type=Path), required=False)
@_CONTENT
def validate(plan: Path, weights: Path | None, content_check: str) -> None:
    """Check PLAN, and that it fits WEIGHTS when given.

    WEIGHTS is a safetensors file, or a sharded checkpoint (its folder or its
    *.safetensors.index.json); for a sharded checkpoint the index and every shard header are
    checked against each other too. A Hugging Face checkpoint folder (config.json beside sharded
    or single-file weights) is checked exactly as `apply` reads it (tied tensors stored once, the
    config changes). Weights already pruned by PLAN are reported as such (exit 1).
    """
    loaded = PrunePlan.load(plan)
    if weights is not None:
        ckpt = weights.parent if weights.name.endswith(".index.json") else weights
        if pruneplan.is_hf_checkpoint(ckpt):  # what `apply` accepts, read as apply reads it
            pruneplan.check_checkpoint(loaded, ckpt, check_content=content_check)
        elif _sharded(weights):
            pruneplan.check_sharded_weights(loaded, weights, check_content=content_check)
        else:
            pruneplan.check_weights(loaded, weights, check_content=content_check)
    fits = f"; fits {weights}" if weights is not None else ""
    click.echo(f"ok: {len(loaded.groups)} groups, digest {loaded.digest()}{fits}")


@cli.command()
@click.argument("plan", type=click.Path(path_type=Path))
@click.option("--model", "model_spec", default=None,
              help="Also count the model's parameters and MACs before -> after (pkg.module:factory).")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="With --model: load these weights first (safetensors).")
@click.option("--input-shape", type=_Shape(), default=None,
              help="With --model: one example's shape, e.g. 3,224,224.")
@click.option("--input-dtype", type=click.Choice(["float32", "long"]), default="float32",
              show_default=True, help="With --model: example input dtype.")
def show(plan: Path, model_spec: str | None, weights: Path | None, input_shape: tuple[int, ...] | None,
         input_dtype: str) -> None:
    """Print PLAN's groups in execution order: kept/size, % removed, parameters and buffer values
    removed; with --model, the model's parameters, buffers and MACs before -> after."""
    if model_spec is None and (weights is not None or input_shape is not None):
        raise click.UsageError("--weights and --input-shape go with --model")
    if model_spec is not None and input_shape is None:
        raise click.UsageError("--model needs --input-shape")
    loaded = PrunePlan.load(plan)
    rows = loaded.summary()
    known = loaded.buffers_known
    pcol = "parameters" if known else "params+bufs"
    width = max([len("group"), *(len(r["group"]) for r in rows)])
    kinds = any(r["kind"] != "channels" for r in rows)  # a kind column for plans with heads
    kind_head = f"  {'kind':<12}" if kinds else ""
    head = f"{'group':<{width}}{kind_head}  {'kept/size':>11}  {'removed':>8}  {pcol:>12}"
    click.echo(head + (f"  {'buffers':>8}" if known else ""))
    for r in rows:
        kept = f"{r['kept']}/{r['size']}"
        kind = f"  {r['kind']:<12}" if kinds else ""
        line = f"{r['group']:<{width}}{kind}  {kept:>11}  {r['fraction']:>8.1%}  {r['parameters']:>12,}"
        click.echo(line + (f"  {r['buffers']:>8,}" if known else ""))
    totals = loaded.totals()
    total, removed = totals["parameters_touched"], totals["parameters_removed"]
    units = sum(r["size"] for r in rows)
    gone = sum(r["removed"] for r in rows)
    if known:
        what = (f"{removed:,} of {total:,} parameters in touched tensors removed "
                f"({removed / max(total, 1):.1%}), and {totals['buffers_removed']:,} buffer values")
    else:
        what = (f"{removed:,} of {total:,} scalars (parameters and buffers: this plan does not record "
                f"which are buffers) in touched tensors removed ({removed / max(total, 1):.1%})")
    click.echo(f"{len(rows)} groups; {gone:,} of {units:,} units; {what}; digest {loaded.digest()[:12]}")
    sel = loaded.provenance.selection
    if "requested_fraction" in sel:
        click.echo(_requested_line(sel))
    if "target" in sel and "achieved" in sel:
        for key, want in sel["target"].items():
            click.echo(f"target: remove {want:.1%} of the {key}; achieved {sel['achieved'].get(key, 0):.1%}")
    if loaded.config is not None:
        for change in loaded.config.changes:
            click.echo(f"config {change.describe()}")
        for problem in loaded.config.problems():
            click.echo(f"config cannot express the pruned model: {problem}")
        saved = loaded.config.saved_names
        if saved:
            first = next(iter(saved))
            click.echo(f"checkpoint names: {len(saved)} tensors are saved under other names "
                       f"(e.g. {first} as {saved[first]})")
    if model_spec is not None:
        from pruneplan import loading  # imports torch: only with --model

        model = _model(model_spec, weights)
        example = _example(model, input_shape, input_dtype, 1)
        before, after = loading.stats_before_after(model, loaded, example)
        _echo_stats(before, after)


def _echo_stats(before, after) -> None:
    for label, a, b in (("parameters", before.params, after.params),
                        ("buffers", before.buffers, after.buffers), ("MACs", before.macs, after.macs)):
        change = f" ({(b - a) / a:+.1%})" if a else ""
        click.echo(f"{label}: {a:,} -> {b:,}{change}")


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
    if result.config_differs:
        click.echo("config changes differ")
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
@click.option("-o", "--output", default=None, help="Write to this file instead of standard output.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def schema(output: str | None, force: bool) -> None:
    """Print the JSON Schema of the plan format."""
    text = json_schema()
    if output is None:
        click.echo(text, nl=False)
        return
    path = _file_output(output)
    pruneplan.write_output(path, text.encode("utf-8"), overwrite=force)
    click.echo(f"wrote {path}")


_FRACTION = click.FloatRange(0, 1, max_open=True)


def _to(batch, device: str):
    """A batch's tensors on ``device`` (for the one-batch checks)."""
    return [b.to(device) if hasattr(b, "to") else b for b in batch]


_MODEL = click.option("--model", "model_spec", required=True,
                      help="Model factory as pkg.module:factory (or file.py:factory).")
_SHAPE = click.option("--input-shape", type=_Shape(), required=True,
                      help="One example's shape, e.g. 3,224,224.")
_DTYPE = click.option("--input-dtype", type=click.Choice(["float32", "long"]), default="float32",
                      show_default=True, help="Example input dtype (long for token ids).")
_WEIGHTS = click.option("--weights", type=click.Path(path_type=Path), default=None,
                        help="Load these weights (safetensors) into the model first.")


def _example(model, shape: tuple[int, ...], dtype: str, batch_size: int = 2):
    """An example batch of ``shape``, checked by running ``model`` on it once."""
    import torch

    from pruneplan import loading

    x = loading.example_input(shape, batch_size=batch_size,
                              dtype=torch.long if dtype == "long" else torch.float32)
    device = next((p.device for p in model.parameters()), None)
    x = x if device is None else x.to(device)
    with _about("--input-shape", ",".join(map(str, shape))):
        loading.check_example(model, x)
    return x


def _model(spec: str, weights: Path | None):
    """The model of ``--model``, with ``--weights`` loaded; errors name the option."""
    from pruneplan import loading

    with _about("--model", spec):
        model = loading.load_model(spec)
    if weights is not None:
        with _about("--weights", weights):
            loading.load_weights(model, weights, spec)
    return model


@cli.command()
@_MODEL
@_WEIGHTS
@_SHAPE
@_DTYPE
def groups(model_spec: str, weights: Path | None, input_shape: tuple[int, ...], input_dtype: str) -> None:
    """List the prunable groups that automatic discovery finds in a model."""
    model = _model(model_spec, weights)
    found = pruneplan.prunable_groups(model, _example(model, input_shape, input_dtype))
    click.echo(pruneplan.describe_groups(found))


def _refuse_ignored(metric: str, given: dict[str, object]) -> None:
    """Usage error for an option the metric would ignore."""
    from pruneplan import loading

    takes = set()
    if loading.metric_needs_data(metric):
        takes |= {"--data", "--criterion", "--max-batches"}
    if metric in loading.RANDOM_METRICS:
        takes.add("--seed")
    takes |= {"--" + k.replace("_", "-") for k in loading.METRIC_PARAMS.get(metric, {})}
    for flag, value in given.items():
        if value is not None and flag not in takes:
            raise click.UsageError(f"metric {metric!r} ignores {flag}; leave it out")
    if "--data" in takes and given["--data"] is None:
        raise click.UsageError(f"metric {metric!r} needs --data")


def _assignments(values: tuple[str, ...], option: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for v in values:
        key, sep, num = v.rpartition("=")
        try:
            out[key] = float(num)
        except ValueError:
            key = ""
        if not sep or not key:
            raise click.BadParameter(f"expected NAME=FRACTION, got {v!r}", param_hint=option)
    return out


@cli.command()
@_MODEL
@_WEIGHTS
@_SHAPE
@_DTYPE
@click.option("--metric", type=_LoadingChoice("METRICS"), required=True)
@click.option("--ratio", type=_FRACTION, default=None, help="Fraction of units to remove, in [0, 1).")
@click.option("--target-macs", type=_FRACTION, default=None,
              help="Instead of --ratio: remove at least this fraction of the MACs (global ranking).")
@click.option("--target-params", type=_FRACTION, default=None,
              help="Instead of --ratio: remove at least this fraction of the parameters (global ranking).")
@click.option("--n-steps", type=click.IntRange(min=1), default=1, show_default=True,
              help="Prune in this many steps, re-scoring between steps; the plans are composed.")
@click.option("--scope", type=click.Choice(["layer", "global"]), default=None,
              help="Ratio per layer or over all units  [default: layer; global with a target]")
@click.option("--layer-ratio", multiple=True, metavar="PATTERN=FRACTION",
              help="Ratio for the groups whose name or root matches the glob PATTERN (repeatable).")
@click.option("--kind-ratio", multiple=True, metavar="KIND=FRACTION",
              help="Ratio for the groups of a kind: channels, heads, query_groups (repeatable). "
                   "heads without query_groups prunes grouped-query attention by its query heads "
                   "(the same count per key/value head).")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Leave the groups whose name or root matches this glob untouched (repeatable).")
@click.option("--round-to", type=click.IntRange(min=1), default=1, show_default=True,
              help="Keep multiples of this many units.")
@click.option("--min-keep", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--data", "data_spec", default=None,
              help="Data factory pkg.module:loader_factory returning (x, y) batches (data metrics).")
@click.option("--criterion", type=_LoadingChoice("CRITERIA"), default=None,
              help="Loss of the data metrics  [default: cross_entropy]")
@click.option("--max-batches", type=click.IntRange(min=1), default=None,
              help="Score on the first N batches of --data only.")
@click.option("--seed", type=int, default=None,
              help="Seed of the random metrics (random, shapley)  [default: 0]")
@click.option("--sv-samples", type=click.IntRange(min=1), default=None,
              help="Shapley: permutations per unit  [default: 5]")
@click.option("--p", "p_norm", type=float, default=None, help="lp_norm: the order p  [default: 2]")
@click.option("--device", default="cpu", show_default=True, help="Where to score (cpu, cuda, cuda:1, mps).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars while scoring (default: when stderr is a terminal).")
@click.option("-o", "--output", required=True, help="Plan file to write (never an input; an existing "
              "file only with --force).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def plan(model_spec: str, weights: Path | None, input_shape: tuple[int, ...], input_dtype: str, metric: str,
         ratio: float | None, target_macs: float | None, target_params: float | None, n_steps: int,
         scope: str | None, layer_ratio: tuple[str, ...], kind_ratio: tuple[str, ...],
         exclude: tuple[str, ...], round_to: int, min_keep: int, data_spec: str | None,
         criterion: str | None, max_batches: int | None, seed: int | None, sv_samples: int | None,
         p_norm: float | None, device: str, progress: bool | None, output: str, force: bool) -> None:
    """Score a model's units with a metric and write the plan that removes RATIO of them (or
    meets a MACs / parameters target).

    The same command gives a byte-identical plan: --seed seeds the random metrics, and a model
    built without --weights is initialised under torch.manual_seed(0).
    """
    from pruneplan import loading

    out = _file_output(output)
    targets = {k: v for k, v in (("macs", target_macs), ("params", target_params)) if v is not None}
    layer_ratios = _assignments(layer_ratio, "--layer-ratio")
    kind_ratios = _assignments(kind_ratio, "--kind-ratio")
    if len(targets) > 1:
        raise click.UsageError("give one of --target-macs and --target-params")
    if targets and (ratio is not None or layer_ratios or kind_ratios):
        raise click.UsageError("give --ratio (or --layer-ratio/--kind-ratio) or a target, not both")
    if not targets and ratio is None and not layer_ratios and not kind_ratios:
        raise click.UsageError("give --ratio, --target-macs or --target-params")
    params = {k: v for k, v in (("sv_samples", sv_samples), ("p", p_norm)) if v is not None}
    if "p" in params and float(params["p"]).is_integer():
        params["p"] = int(params["p"])  # the same plan bytes as the API's p=1
    _refuse_ignored(metric, {"--data": data_spec, "--criterion": criterion, "--max-batches": max_batches,
                             "--seed": seed, "--sv-samples": sv_samples, "--p": p_norm})
    inputs = [p for p in (weights, _spec_file(model_spec), _spec_file(data_spec)) if p is not None]
    pruneplan.check_output(out, inputs, force)  # before the (long) scoring
    with _about("--device", device):
        loading.check_device(device)
    import torch

    torch.manual_seed(0)  # a model built without --weights gets the same initial weights every run
    model = _model(model_spec, weights).to(device)
    example = _example(model, input_shape, input_dtype)
    data = None
    if data_spec:
        with _about("--data", data_spec):
            data, first = loading.load_data(data_spec)
        # its messages name the data or the criterion
        loading.check_criterion(model, _to(first, device), criterion or "cross_entropy")
    made = pruneplan.plan_from_metric(
        model, example, metric, ratio, target=targets or None, n_steps=n_steps, scope=scope,
        round_to=round_to, min_keep=min_keep, layer_ratios=layer_ratios or None,
        kind_ratios=kind_ratios or None, exclude=exclude, data=data, criterion=criterion, device=device,
        seed=seed, metric_params=params or None, max_batches=max_batches,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    pruneplan.write_output(out, made.to_json().encode("utf-8"), inputs, force)
    units = sum(len(g.removed) for g in made.groups)
    click.echo(f"wrote {out}: {len(made.groups)} groups, {units:,} units removed, "
               f"digest {made.digest()[:12]}")
    sel = made.provenance.selection
    if "requested_fraction" in sel:
        click.echo(_requested_line(sel))
    for key, want in sel.get("target", {}).items():
        click.echo(f"target: remove {want:.1%} of the {key}; achieved {sel['achieved'][key]:.2%}")
    before, after = loading.stats_before_after(model, made, _example(model, input_shape, input_dtype, 1))
    _echo_stats(before, after)


def _spec_file(spec: str | None) -> Path | None:
    """The file of a ``file.py:factory`` spec (an input the output must not replace)."""
    if spec is None:
        return None
    path = Path(spec.rpartition(":")[0] or spec)
    return path if path.suffix == ".py" else None


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()


def _requested_line(sel: dict) -> str:
    """The ratio as given, and the requested/achieved units as fractions of the groups considered."""
    asked = [f"ratio {sel.get('ratio', 0.0):g}"] if sel.get("ratio") else []
    asked += [f"{k}={v:g}" for k, v in sel.get("kind_ratios", {}).items()]
    asked += [f"{k}={v:g}" for k, v in sel.get("layer_ratios", {}).items()]
    head = f"requested {', '.join(asked) or 'ratio 0'} (scope {sel.get('scope', 'layer')})"
    if "units" not in sel:  # a plan made before the counts were recorded
        return (f"{head}: {sel['requested_fraction']:.1%} of the units of the groups considered, "
                f"achieved {sel['achieved_fraction']:.1%}")
    units = sel["units"]
    if units == 0:  # the warning says why (every root left out): shown here too, with the request
        return (f"{head}: no prunable group was considered, so nothing is removed (the warning says "
                f"why; `pruneplan groups` lists every root left out with its reason)")
    return (f"{head}: {sel['requested_units']:,} units after flooring per "
            f"{'group' if sel.get('scope', 'layer') == 'layer' else 'kind'} "
            f"({sel['requested_fraction']:.1%} of the {units:,} units of the groups considered); "
            f"removed {round(sel['achieved_fraction'] * units):,} ({sel['achieved_fraction']:.1%}; "
            f"round_to={sel.get('round_to', 1)}, min_keep={sel.get('min_keep', 1)})"
            + (f"; {len(sel['unscored_groups'])} groups have no scores and keep their units: "
               f"{', '.join(sel['unscored_groups'][:5])}" if sel.get("unscored_groups") else ""))
