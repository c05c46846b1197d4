"""The whole experiment as one call: text -> contexts -> activations -> statistics -> outputs.

Entry point: :func:`run`. Each stage is a plain function of its own module; this module only
calls them in order, writes their results into the run directory (see
:mod:`neuronprobe.rundir`) and records what was done in ``run.json``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neuronprobe import rundir
from neuronprobe.activations import extract_to_file, hook_points, resolve_layers
from neuronprobe.config import STATISTICS_SETTINGS, RunConfig
from neuronprobe.contexts import collect_contexts, load_contexts, resolve_contrast, save_contexts
from neuronprobe.errors import NeuronprobeError
from neuronprobe.figures import (
    accuracy_figure,
    control_figure,
    layers_figure,
    neuron_figure,
    save_figure,
)
from neuronprobe.models import load_model
from neuronprobe.statistics import fit_neuron_logits
from neuronprobe.tables import layer_table, neuron_table
from neuronprobe.text import Corpus, open_corpus

logger = logging.getLogger(__name__)

VERSIONED_PACKAGES = (
    "neuronprobe",
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "numpy",
    "scipy",
    "pandas",
    "pyarrow",
    "statsmodels",
    "scikit-learn",
    "matplotlib",
    "gguf",
    "accelerate",
)


@dataclass
class RunResult:
    """What :func:`run` produced: the run directory and its tables and figures in memory."""

    directory: Path
    record: dict[str, Any]
    neurons: pd.DataFrame | None = None  # None when the run stopped after the contexts
    layers: pd.DataFrame | None = None
    figures: dict[str, Any] = field(default_factory=dict)


def default_out() -> Path:
    """``runs/<UTC timestamp>`` in the current folder."""
    return Path("runs") / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def versions() -> dict[str, str]:
    """Python, platform and the versions of the packages a result depends on."""
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


# Settings that decide which contexts a run collects: equal settings, reusable contexts.
CONTEXT_SETTINGS = (
    "model",
    "corpus",
    "text_column",
    "contrast",
    "min_per_class",
    "drop_duplicates",
    "normalize_apostrophes",
    "seed",
)


def open_run_directory(out: Path, config: RunConfig, force: bool) -> dict[str, Any] | None:
    """Create the run directory, or find in it contexts this run may reuse.

    Returns the earlier ``run.json`` when ``out`` holds contexts collected with the same
    :data:`CONTEXT_SETTINGS` (by ``neuronprobe contexts``, or by an unfinished or identical
    run); None for a new run. Refuses any other folder that holds files, unless ``force``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NeuronprobeError(f"--out {out} is a file; name a folder for the run.")
    if not out.is_dir() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return None
    if force:
        return None
    earlier = _reusable_record(out, config)
    if earlier is None:
        raise NeuronprobeError(
            f"--out {out} already holds files (an earlier run with other settings?); choose "
            "another --out, or pass --force to overwrite its results."
        )
    return earlier


def _reusable_record(out: Path, config: RunConfig) -> dict[str, Any] | None:
    try:
        earlier = rundir.read_json(out / rundir.RUN_JSON)
        settings = earlier["config"]
    except (OSError, ValueError, KeyError):
        return None
    wanted = json.loads(json.dumps(config.to_dict()))  # as run.json holds it: lists, not tuples
    if earlier.get("stages", {}).get("contexts") != "complete":
        return None
    if not (out / rundir.CONTEXTS).is_file():
        return None
    if any(settings.get(key) != wanted[key] for key in CONTEXT_SETTINGS):
        return None
    # Later stages may be redone only where they were never finished, or would come out the same.
    if earlier.get("stages", {}).get("statistics") == "complete" and settings != wanted:
        return None
    return earlier


def run(
    config: RunConfig | None = None,
    out: Path | str | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    stop_after: str | None = None,
) -> RunResult:
    """Run the experiment described by ``config`` and write its run directory.

    Parameters
    ----------
    config:
        Every setting; the default is the notebook's analysis on the offline defaults
        (SmolLM2-135M, the movie reviews, "can" vs "can't").
    out:
        The run directory (default ``runs/<timestamp>``).
    force:
        Allow writing into a folder that already holds other results.
    progress:
        Show progress bars.
    stop_after:
        ``"contexts"`` to collect and save the contexts only (``neuronprobe contexts``), or
        ``"activations"`` to stop after recording them (``neuronprobe activations``); a later
        run with the same ``--out`` and settings reuses what is there.

    Returns
    -------
    RunResult
        The run directory, the neuron and layer tables, ``run.json``'s content and the figures.
    """
    config = config or RunConfig()
    # Cheap input checks (the corpus exists and is readable) before anything is written.
    corpus = open_corpus(config.corpus, text_column=config.text_column)
    if stop_after not in (None, "contexts", "activations"):
        raise ValueError(
            f"stop_after must be None, 'contexts' or 'activations', got {stop_after!r}"
        )
    directory = Path(out) if out is not None else default_out()
    earlier = open_run_directory(directory, config, force)
    timings: dict[str, float] = {}
    record: dict[str, Any] = {
        "status": "running",
        # Reused contexts stay marked complete, so a resumed run can itself be resumed.
        "stages": {"contexts": "complete"} if earlier else {},
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "seed": config.seed,
        "versions": versions(),
        "timings_s": timings,
    }
    rundir.write_json(directory / rundir.RUN_JSON, record)
    try:
        return _run_stages(config, corpus, directory, record, earlier, progress, stop_after)
    except BaseException as error:
        # run.json must never claim a run that stopped half-way was complete.
        interrupted = isinstance(error, KeyboardInterrupt)
        record["status"] = "interrupted" if interrupted else "failed"
        record["error"] = f"{type(error).__name__}: {error}"
        rundir.write_json(directory / rundir.RUN_JSON, record)
        raise


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)
    logger.info("%s done in %.1f s", name, timings[name])


def _run_stages(
    config: RunConfig,
    corpus: Corpus,
    directory: Path,
    record: dict[str, Any],
    earlier: dict[str, Any] | None,
    progress: bool,
    stop_after: str | None,
) -> RunResult:
    timings: dict[str, float] = record["timings_s"]

    def stage(name: str) -> Any:
        return _timed(timings, name)

    # The model before the scan: its tokenizer defines the contexts, and a bad --model fails fast.
    with stage("model"):
        loaded = load_model(config.model, device=config.device, dtype=config.dtype)
        n_layers = len(hook_points(loaded.model, config.site))
        layers = resolve_layers(config.layers, n_layers)
        if config.figure_layer not in layers:
            raise NeuronprobeError(
                f"--layer {config.figure_layer} is not among the recorded layers {layers}; "
                "choose one of them for the per-neuron figures."
            )
        length = config.contrast.context_length + 1
        if not -length <= config.position < length:
            raise NeuronprobeError(
                f"--position {config.position} is outside the {length}-token contexts; use "
                f"-{length} to {length - 1} (-1 = the target)."
            )
        contrast_ids = resolve_contrast(config.contrast, loaded.tokenizer)
    record["model"] = loaded.identity
    record["contrast"] = {
        **config.contrast.__dict__,
        "description": config.contrast.describe(),
        "target_id": contrast_ids.target_id,
        "positive_ids": [list(ids) for ids in contrast_ids.positive_sequences],
        "excluded_ids": sorted(contrast_ids.excluded_ids),
    }

    if earlier is not None:
        logger.info("reusing the contexts in %s", directory / rundir.CONTEXTS)
        contexts = load_contexts(directory / rundir.CONTEXTS)
        for key in ("corpus", "counts"):
            record[key] = earlier[key]
        timings["contexts"] = earlier["timings_s"].get("contexts", 0.0)
    else:
        with stage("contexts"):
            contexts = collect_contexts(
                corpus.documents(),
                loaded.tokenizer,
                config.contrast,
                min_per_class=config.min_per_class,
                seed=config.seed,
                drop_duplicates=config.drop_duplicates,
                normalize_apostrophes=config.normalize_apostrophes,
                progress=progress,
            )
            save_contexts(contexts, directory / rundir.CONTEXTS, loaded.tokenizer, config.contrast)
        record["corpus"] = corpus.identity()
        record["counts"] = {**contexts.counts, "contexts": len(contexts)}
    record["stages"]["contexts"] = "complete"
    rundir.write_json(directory / rundir.RUN_JSON, record)
    if stop_after == "contexts":
        return _finish(directory, record)

    with stage("activations"):
        activations = extract_to_file(
            loaded.model,
            contexts.tokens,
            directory / rundir.ACTIVATIONS,
            identity=loaded.identity,
            layers=layers,
            site=config.site,
            position=config.position,
            batch_size=config.batch_size,
            progress=progress,
        )
        shape = activations.shape
    record["stages"]["activations"] = "complete"
    record["activations"] = {
        "file": rundir.ACTIVATIONS,
        "shape": list(shape),
        "dtype": "float32",
        "axes": ["layer", "context", "neuron"],
        "layers": layers,
        "site": config.site,
        "position": config.position,
    }
    if stop_after == "activations":
        return _finish(directory, record)

    outputs = _statistics_and_figures(
        config,
        activations,
        contexts.labels,
        contexts.document_ids,
        layers,
        directory,
        record,
        progress,
    )
    result = _finish(directory, record)
    _report(directory, record)
    result.neurons, result.layers, result.figures = outputs
    return result


def _report(directory: Path, record: dict[str, Any]) -> None:
    """The last stage: ``report.html`` from the finished run directory's files."""
    from neuronprobe.report import write_report

    with _timed(record["timings_s"], "report"):
        write_report(directory)
    record["stages"]["report"] = "complete"
    rundir.write_json(directory / rundir.RUN_JSON, record)


def report(out: Path | str) -> Path:
    """Write (or rewrite) ``report.html`` of a finished run directory (``neuronprobe report``).

    Returns
    -------
    Path
        The report's path.
    """
    from neuronprobe.report import write_report

    directory = Path(out)
    record = _read_record(directory)
    if record.get("stages", {}).get("statistics") != "complete":
        raise NeuronprobeError(
            f"--out {directory} has no finished statistics; run `neuronprobe run --out "
            f"{directory}` (or `neuronprobe probe`) first."
        )
    return write_report(directory)


def _statistics_and_figures(
    config: RunConfig,
    activations: Any,
    labels: Any,
    document_ids: list[str],
    layers: list[int],
    directory: Path,
    record: dict[str, Any],
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Fit every neuron, write the tables and figures, and record the statistics in ``record``.

    ``activations`` is ``[layers, contexts, neurons]`` (a memory map is read layer by layer).
    """
    timings: dict[str, float] = record["timings_s"]
    seed = config.seed if config.statistics_seed is None else config.statistics_seed
    with _timed(timings, "statistics"):
        fits = fit_neuron_logits(
            activations,
            labels,
            alpha=config.alpha,
            test_size=config.test_size,
            seed=seed,
            groups=np.asarray(document_ids) if config.split_by_document else None,
            engine=config.engine,
            cv=config.cv or None,
            shuffled_control=config.shuffled_control,
            progress=progress,
        )
        neurons = neuron_table(
            fits, layers, config.significance, correction=config.correction, test=config.test
        )
        layers_profile = layer_table(neurons)
        with rundir.atomic_path(directory / rundir.NEURONS) as temporary:
            neurons.to_parquet(temporary, index=False)
        with rundir.atomic_path(directory / rundir.NEURONS_CSV) as temporary:
            neurons.to_csv(temporary, index=False)
        with rundir.atomic_path(directory / rundir.LAYERS) as temporary:
            layers_profile.to_csv(temporary, index=False)
    record["statistics"] = {
        "model": "L1-penalised logistic regression per neuron (statsmodels' objective, exact "
        "optimum)",
        "engine": config.engine,
        "alpha": config.alpha,
        "train_contexts": int(fits.train_mask.sum()),
        "test_contexts": int((~fits.train_mask).sum()),
        "split": (
            f"one stratified split shared by all neurons (test_size={config.test_size}, "
            f"seed={seed}" + (", whole documents on one side)" if config.split_by_document else ")")
        ),
        "test": config.test,
        "pvalue": "Wald, statsmodels' formula; NaN where the slope is 0",
        "pvalue_lr": "likelihood ratio of the unpenalised logit against the intercept-only "
        "model, chi-square with 1 degree of freedom",
        "correction": config.correction,
        "significance": config.significance,
        "threshold": float(neurons["threshold"].iloc[0]),
        "significant_neurons": int(neurons["significant"].sum()),
        "significant_shuffled": (
            int(neurons["significant_shuffled"].sum())
            if "significant_shuffled" in neurons.columns
            else None
        ),
        "cv": config.cv,
        "not_converged": int((~fits.converged).sum()),
        "constant_neurons": int(fits.constant.sum()),
        "separated_neurons": int(fits.separated.sum()),
    }

    with _timed(timings, "figures"):
        pvalue = "pvalue" if config.test == "wald" else "pvalue_lr"
        figures = {
            f"neurons_layer{config.figure_layer}": neuron_figure(
                neurons, config.figure_layer, config.contrast.negative_name, pvalue=pvalue
            ),
            f"accuracy_layer{config.figure_layer}": accuracy_figure(neurons, config.figure_layer),
            "layers": layers_figure(layers_profile),
        }
        if "percent_significant_shuffled" in layers_profile.columns:
            figures["control"] = control_figure(layers_profile)
        for name, figure in figures.items():
            save_figure(figure, directory / rundir.FIGURES / name)
    record["stages"].update(activations="complete", statistics="complete", figures="complete")
    return neurons, layers_profile, figures


def probe(out: Path | str, *, progress: bool = False, **changes: Any) -> RunResult:
    """Refit the statistics of a finished run from its stored activations (no model needed).

    ``neuronprobe probe --out RUN_DIR``: reads ``run.json``, ``contexts.parquet`` and
    ``activations.npy`` from ``out``, applies ``changes`` (any of
    :data:`STATISTICS_SETTINGS`: a new alpha, correction, test, seed...), refits every neuron
    and rewrites the tables, figures and ``run.json``.  The tables and figures it replaces,
    when the settings differ, are first moved to ``history/<time of the earlier statistics>/``:
    a refit never destroys earlier results.

    ``statistics_seed`` changes the split, folds and shuffled labels but not which contexts
    were sampled (those are in ``contexts.parquet``, drawn with ``seed``).
    """
    directory = Path(out)
    record = _read_record(directory)
    stages = record.get("stages", {})
    if stages.get("activations") != "complete" or not (directory / rundir.ACTIVATIONS).is_file():
        raise NeuronprobeError(
            f"--out {directory} has no finished activations; run `neuronprobe run --out "
            f"{directory}` first (it resumes an unfinished run)."
        )
    unknown = sorted(set(changes) - set(STATISTICS_SETTINGS))
    if unknown:
        raise NeuronprobeError(
            f"probe cannot change {', '.join(unknown)}: they decide the contexts or "
            "activations; start a new run instead."
        )
    config = RunConfig.from_dict({**record["config"], **changes})
    layers = list(record["activations"]["layers"])
    if config.figure_layer not in layers:
        raise NeuronprobeError(
            f"--layer {config.figure_layer} is not among the recorded layers {layers}."
        )
    _archive_statistics(directory, record)
    contexts = load_contexts(directory / rundir.CONTEXTS)
    activations = np.load(directory / rundir.ACTIVATIONS, mmap_mode="r")
    record["config"] = config.to_dict()
    record["status"] = "running"
    record["stages"]["statistics"] = "running"
    record["probed"] = datetime.now(UTC).isoformat(timespec="seconds")
    rundir.write_json(directory / rundir.RUN_JSON, record)
    try:
        outputs = _statistics_and_figures(
            config,
            activations,
            contexts.labels,
            contexts.document_ids,
            layers,
            directory,
            record,
            progress,
        )
    except BaseException as error:
        record["status"] = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        record["stages"]["statistics"] = "failed"
        record["error"] = f"{type(error).__name__}: {error}"
        rundir.write_json(directory / rundir.RUN_JSON, record)
        raise
    result = _finish(directory, record)
    _report(directory, record)
    result.neurons, result.layers, result.figures = outputs
    return result


def _read_record(directory: Path) -> dict[str, Any]:
    """``run.json`` of a run directory, or a one-line error naming it."""
    try:
        return rundir.read_json(directory / rundir.RUN_JSON)
    except (OSError, ValueError) as error:
        raise NeuronprobeError(
            f"--out {directory} holds no readable run.json ({error}); name a run directory "
            "written by `neuronprobe run`."
        ) from error


def _archive_statistics(directory: Path, record: dict[str, Any]) -> None:
    """Move the current tables, figures and run.json to ``history/<finished>/``."""
    if record.get("stages", {}).get("statistics") != "complete":
        return
    stamp = str(record.get("finished", "unknown")).replace(":", "").replace("+0000", "")
    target = directory / "history" / stamp
    suffix = 1
    while target.exists():
        suffix += 1
        target = directory / "history" / f"{stamp}-{suffix}"
    target.mkdir(parents=True)
    for name in (rundir.NEURONS, rundir.NEURONS_CSV, rundir.LAYERS, rundir.FIGURES, rundir.REPORT):
        source = directory / name
        if source.is_dir():
            shutil.copytree(source, target / name)
        elif source.is_file():
            shutil.copy2(source, target / name)
    rundir.write_json(target / rundir.RUN_JSON, record)
    logger.info("earlier statistics kept in %s", target)


def _finish(directory: Path, record: dict[str, Any]) -> RunResult:
    record["status"] = "complete"
    record["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    rundir.write_json(directory / rundir.RUN_JSON, record)
    return RunResult(directory, record)
