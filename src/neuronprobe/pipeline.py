"""The whole experiment as one call: text -> contexts -> activations -> statistics -> outputs.

Entry point: :func:`run`. Each stage is a plain function of its own module; this module only
calls them in order, writes their results into the run directory (see
:mod:`neuronprobe.rundir`) and records what was done in ``run.json``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
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
from neuronprobe.activations import extract_activations, resolve_layers, site_modules, site_width
from neuronprobe.config import RunConfig
from neuronprobe.contexts import collect_contexts, resolve_contrast, save_contexts
from neuronprobe.errors import NeuronprobeError
from neuronprobe.figures import accuracy_figure, layers_figure, neuron_figure, save_figure
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
    neurons: pd.DataFrame
    layers: pd.DataFrame
    record: dict[str, Any]
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


def prepare_out(out: Path, force: bool) -> Path:
    """Create the run directory; refuse one that already holds files unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NeuronprobeError(f"--out {out} is a file; name a folder for the run.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise NeuronprobeError(
            f"--out {out} already holds files (an earlier run?); choose another --out, "
            "or pass --force to overwrite its results."
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def run(
    config: RunConfig | None = None,
    out: Path | str | None = None,
    *,
    force: bool = False,
    progress: bool = True,
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
        Allow writing into a folder that already holds files.
    progress:
        Show progress bars.

    Returns
    -------
    RunResult
        The run directory, the neuron and layer tables, ``run.json``'s content and the figures.
    """
    config = config or RunConfig()
    # Cheap input checks (the corpus exists and is readable) before anything is written.
    corpus = open_corpus(config.corpus, text_column=config.text_column)
    directory = prepare_out(Path(out) if out is not None else default_out(), force)
    timings: dict[str, float] = {}
    record: dict[str, Any] = {
        "status": "running",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "seed": config.seed,
        "versions": versions(),
        "timings_s": timings,
    }
    rundir.write_json(directory / rundir.RUN_JSON, record)
    try:
        return _run_stages(config, corpus, directory, record, progress)
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
    config: RunConfig, corpus: Corpus, directory: Path, record: dict[str, Any], progress: bool
) -> RunResult:
    timings: dict[str, float] = record["timings_s"]

    def stage(name: str) -> Any:
        return _timed(timings, name)

    # The model before the scan: its tokenizer defines the contexts, and a bad --model fails fast.
    with stage("model"):
        loaded = load_model(config.model, device=config.device)
        n_layers = len(site_modules(loaded.model, config.site))
        layers = resolve_layers(config.layers, n_layers)
        if config.figure_layer not in layers:
            raise NeuronprobeError(
                f"--layer {config.figure_layer} is not among the recorded layers {layers}; "
                "choose one of them for the per-neuron figures."
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

    with stage("contexts"):
        contexts = collect_contexts(
            corpus.documents(),
            loaded.tokenizer,
            config.contrast,
            min_per_class=config.min_per_class,
            seed=config.seed,
            progress=progress,
        )
        save_contexts(contexts, directory / rundir.CONTEXTS, loaded.tokenizer, config.contrast)
    record["corpus"] = corpus.identity()
    record["counts"] = {**contexts.counts, "contexts": len(contexts)}

    with stage("activations"):
        shape = (len(layers), len(contexts), site_width(loaded.model, config.site))
        with rundir.atomic_path(directory / rundir.ACTIVATIONS) as temporary:
            activations = np.lib.format.open_memmap(
                temporary, mode="w+", dtype=np.float32, shape=shape
            )
            extract_activations(
                loaded.model,
                contexts.tokens,
                layers=layers,
                site=config.site,
                batch_size=config.batch_size,
                out=activations,
                progress=progress,
            )
            activations.flush()
            del activations
        activations = np.load(directory / rundir.ACTIVATIONS, mmap_mode="r")
    record["activations"] = {
        "file": rundir.ACTIVATIONS,
        "shape": list(shape),
        "dtype": "float32",
        "axes": ["layer", "context", "neuron"],
        "layers": layers,
        "site": config.site,
        "position": "last token (the target)",
    }

    with stage("statistics"):
        fits = fit_neuron_logits(
            activations,
            contexts.labels,
            alpha=config.alpha,
            test_size=config.test_size,
            seed=config.seed,
        )
        neurons = neuron_table(fits, layers, config.significance)
        layers_profile = layer_table(neurons)
        with rundir.atomic_path(directory / rundir.NEURONS) as temporary:
            neurons.to_parquet(temporary, index=False)
        with rundir.atomic_path(directory / rundir.LAYERS) as temporary:
            layers_profile.to_csv(temporary, index=False)
    record["statistics"] = {
        "model": "L1-penalised logistic regression per neuron (statsmodels' objective, exact optimum)",
        "alpha": config.alpha,
        "train_contexts": int(fits.train_mask.sum()),
        "test_contexts": int((~fits.train_mask).sum()),
        "split": f"one stratified split shared by all neurons (test_size={config.test_size}, seed={config.seed})",
        "pvalue": "Wald, statsmodels' formula; NaN where the slope is 0",
        "correction": "bonferroni per layer",
        "threshold": config.significance / shape[2],
        "significant_neurons": int(neurons["significant"].sum()),
        "not_converged": int((~fits.converged).sum()),
        "constant_neurons": int(fits.constant.sum()),
    }

    with stage("figures"):
        figures = {
            f"neurons_layer{config.figure_layer}": neuron_figure(
                neurons, config.figure_layer, config.contrast.negative_name
            ),
            f"accuracy_layer{config.figure_layer}": accuracy_figure(neurons, config.figure_layer),
            "layers": layers_figure(layers_profile),
        }
        for name, figure in figures.items():
            save_figure(figure, directory / rundir.FIGURES / name)

    record["status"] = "complete"
    record["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    rundir.write_json(directory / rundir.RUN_JSON, record)
    return RunResult(directory, neurons, layers_profile, record, figures)
