"""The whole experiment as one call: text -> contexts -> activations -> statistics ->
interventions -> decoding -> outputs.

Entry point: :func:`run`. Each stage is a plain function of its own module; this module only
calls them in order, writes their results into the run directory (see
:mod:`neuronprobe.rundir`) and records what was done in ``run.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
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
from neuronprobe.activations import (
    ActivationFile,
    extract_to_file,
    hook_points,
    resolve_layers,
    site_width,
)
from neuronprobe.config import (
    DECODING_SETTINGS,
    INTERVENTION_SETTINGS,
    RESUMABLE_CHANGES,
    STATISTICS_SETTINGS,
    RunConfig,
    check_ablate_k,
    check_decode_cv,
    check_decode_k,
    decode_k_sizes,
)
from neuronprobe.contexts import (
    Contexts,
    collect_contexts,
    load_contexts,
    resolve_contrast,
    save_contexts,
)
from neuronprobe.errors import NeuronprobeError
from neuronprobe.models import LoadedModel, check_model, load_model
from neuronprobe.text import Corpus, open_corpus

# The statistics, tables and figures (torch, numba, matplotlib) are imported where they are
# used: bad input is refused before those imports, in a fraction of a second.

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


# Settings each stage's output depends on, besides those of the stages before it. Others
# (device, batch size) say how a stage runs, not what it gives.
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
ACTIVATION_SETTINGS = ("dtype", "site", "layers", "position")
STAGE_SETTINGS = {
    "contexts": CONTEXT_SETTINGS,
    "activations": ACTIVATION_SETTINGS,
    "statistics": STATISTICS_SETTINGS,
    "interventions": INTERVENTION_SETTINGS,
    "decoding": DECODING_SETTINGS,
}
#: The stages in order; each needs the files of those before it.
STAGES = ("contexts", "activations", "statistics", "interventions", "decoding", "report")
#: The decoding's inverse L2 penalty strength (scikit-learn's ``C``, on standardized neurons).
DECODE_C = 1.0
_ACTIVATION_FILES = ActivationFile(Path(rundir.ACTIVATIONS), {})
#: What the statistics and the stages after them write: what a refit copies to history/.
RESULT_FILES = (
    rundir.NEURONS,
    rundir.NEURONS_CSV,
    rundir.LAYERS,
    rundir.SPLIT,
    rundir.INTERVENTIONS,
    rundir.DECODING,
    rundir.FIGURES,
    rundir.REPORT,
)
#: Everything a run writes into its directory (what ``--force`` sets aside).
RUN_FILES = (
    rundir.RUN_JSON,
    rundir.CONTEXTS,
    rundir.ACTIVATIONS,
    _ACTIVATION_FILES.described.name,
    _ACTIVATION_FILES.partial.name,
    _ACTIVATION_FILES.progress_file.name,
    _ACTIVATION_FILES.logprob_path.name,
    _ACTIVATION_FILES.logprob_partial.name,
    *RESULT_FILES,
)


def stage_files(stage: str, directory: Path, record: dict[str, Any]) -> list[str]:
    """The files stage ``stage`` writes (relative to the run directory)."""
    if stage == "contexts":
        return [rundir.CONTEXTS]
    if stage == "activations":
        files = [rundir.ACTIVATIONS, _ACTIVATION_FILES.described.name]
        if record.get("activations", {}).get("positive_first_ids"):
            files.append(_ACTIVATION_FILES.logprob_path.name)
        return files
    if stage == "statistics":
        # split.csv where run.json names it (run directories from before it have none).
        split = [rundir.SPLIT] if record.get("statistics", {}).get("split_file") else []
        return [
            rundir.NEURONS,
            rundir.NEURONS_CSV,
            rundir.LAYERS,
            *split,
            *rundir.figure_files(directory, record, ("statistics",)),
        ]
    if stage == "interventions":
        # Nothing where the stage had nothing to do (--no-interventions, another position).
        if "figures" not in record.get("interventions", {}):
            return []
        return [rundir.INTERVENTIONS, *rundir.figure_files(directory, record, ("interventions",))]
    if stage == "decoding":
        # Nothing where the stage had nothing to do (--no-decoding).
        if "figures" not in record.get("decoding", {}):
            return []
        return [rundir.DECODING, *rundir.figure_files(directory, record, ("decoding",))]
    return [rundir.REPORT]


def open_run_directory(
    out: Path, config: RunConfig, *, force: bool = False, resume: bool = False
) -> dict[str, Any] | None:
    """Create the run directory, or find in it the earlier run this one continues.

    Returns the earlier ``run.json`` when ``out`` holds a run with the same settings for every
    stage it finished (so that those stages are reused: ``neuronprobe contexts`` then ``run``,
    a rerun of an interrupted run, ``--resume``); None for a new run.  Any other folder that
    holds files is refused, unless ``force``, which first moves the earlier run's files to
    ``history/`` (nothing is deleted).  Whether the earlier run is the same is decided by the
    stages its ``run.json`` marks complete, even where their files were damaged since (those
    stages are then recomputed, see :func:`usable_stages`).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NeuronprobeError(f"--out {out} is a file; name a folder for the run.")
    if not out.is_dir() or not any(out.iterdir()):
        if resume:
            raise NeuronprobeError(
                f"--resume: {out} holds no run to resume; drop --resume to start one there."
            )
        out.mkdir(parents=True, exist_ok=True)
        return None
    if force:
        _set_aside(out)
        return None
    try:
        earlier = rundir.read_json(out / rundir.RUN_JSON)
        earlier["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        raise NeuronprobeError(
            f"--out {out} already holds files but no readable run.json of a neuronprobe run; "
            "choose another --out, or pass --force to write there (its files are kept)."
        ) from None
    if not completed_stages(earlier):
        return None  # it stopped before finishing anything (bad input, an early Ctrl-C)
    if resume:
        return earlier  # its own settings (see resumed_config)
    refusal = _different(earlier, config)
    if refusal:
        raise NeuronprobeError(
            f"--out {out} already holds a different run ({refusal}); choose another --out, "
            f"`neuronprobe run --out {out} --resume` to finish that run with its own settings, "
            "`neuronprobe probe` to refit it with other statistics settings, `neuronprobe "
            "intervene` to redo its interventions with other settings, `neuronprobe decode` to "
            "redo its decoding with other settings, or --force to start anew there (the "
            "earlier files move to history/)."
        )
    return earlier


def completed_stages(record: dict[str, Any]) -> set[str]:
    """The stages ``run.json`` marks complete (whether or not their files are still whole)."""
    stages = record.get("stages", {})
    return {stage for stage in STAGES if stages.get(stage) == "complete"}


def usable_stages(directory: Path, record: dict[str, Any]) -> tuple[set[str], dict[str, str]]:
    """The finished stages that can be reused, and why the others marked complete cannot.

    A stage is usable when ``run.json`` marks it complete, all its files are whole (see
    :func:`neuronprobe.rundir.file_problem`) and so is every stage before it (a stage's
    results depend on those before it).

    Returns
    -------
    usable, damaged
        The usable stages; ``{stage: "FILE is PROBLEM"}`` for the first damaged file of each
        stage that ``run.json`` marks complete but cannot be reused.
    """
    usable: set[str] = set()
    damaged: dict[str, str] = {}
    completed = completed_stages(record)
    for stage in STAGES:
        if stage not in completed:
            break
        for name in stage_files(stage, directory, record):
            problem = rundir.file_problem(directory, name, record)
            if problem is not None:
                damaged[stage] = f"{name} is {problem}"
                break
        if stage in damaged:
            break
        usable.add(stage)
    return usable, damaged


def require_stage(directory: Path, record: dict[str, Any], stage: str) -> None:
    """Refuse, in one line, a run whose ``stage`` (and every stage before it) is not finished
    with all its files whole; the message names the first damaged file."""
    usable, damaged = usable_stages(directory, record)
    if stage in usable:
        return
    resume = f"`neuronprobe run --out {directory} --resume`"
    problem = next(iter(damaged.values()), None)
    if problem is not None:
        raise NeuronprobeError(f"{directory}/{problem}; {resume} recomputes it.")
    raise NeuronprobeError(
        f"--out {directory} has no finished {stage}; finish the run first with {resume}."
    )


def _different(earlier: dict[str, Any], config: RunConfig) -> str | None:
    """Why the run recorded in ``earlier`` is not this one, or None if this one may continue it.

    Settings may differ only for the stages the earlier run did not finish (and those after).
    The answer names each setting with both values: ``seed 0 in the folder, 3 asked``.
    """
    settings = _comparable(earlier["config"], earlier)
    wanted = _comparable(config.to_dict(), earlier)
    completed = completed_stages(earlier)
    for stage, names in STAGE_SETTINGS.items():
        if stage != "contexts" and stage not in completed:
            break
        changed = _differences(settings, wanted, names)
        if changed:
            return "; ".join(changed)
    return None


def _differences(
    old: dict[str, Any], new: dict[str, Any], names: Any, prefix: str = ""
) -> list[str]:
    """``NAME OLD in the folder, NEW asked`` for each of ``names`` that differs (one level into
    tables such as the contrast)."""
    found = []
    for name in names:
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            found += _differences(before, after, sorted({*before, *after}), f"{prefix}{name} ")
        else:
            found.append(f"{prefix}{name} {before!r} in the folder, {after!r} asked")
    return found


def _comparable(settings: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """Settings as run.json holds them (lists, not tuples), the ``--engine ray`` alias read
    as ``executor``, and the figure layer as resolved for ``record``'s recorded layers."""
    config = RunConfig.from_dict(json.loads(json.dumps(settings)))
    comparable = json.loads(json.dumps(config.to_dict()))
    layers = record.get("activations", {}).get("layers")
    if layers:
        with contextlib.suppress(NeuronprobeError):
            comparable["figure_layer"] = config.resolved_figure_layer(
                layers, record.get("model", {}).get("layers")
            )
    return comparable


def _set_aside(directory: Path) -> None:
    """Move an earlier run's files to ``history/<time>-replaced/`` (``--force``)."""
    present = [name for name in RUN_FILES if (directory / name).exists()]
    if not present:
        return
    target = rundir.history_folder(directory, "replaced")
    target.mkdir(parents=True)
    for name in present:
        os.replace(directory / name, target / name)
    logger.warning("--force: the earlier run's files moved to %s (delete it to free space)", target)


def run(
    config: RunConfig | None = None,
    out: Path | str | None = None,
    *,
    force: bool = False,
    resume: bool = False,
    progress: bool = True,
    stop_after: str | None = None,
) -> RunResult:
    """Run the experiment described by ``config`` and write its run directory.

    Parameters
    ----------
    config:
        Every setting; the default is the notebook's analysis on the offline defaults
        (SmolLM2-135M, the movie reviews, "can" vs "can't").  With ``resume``, None means the
        settings recorded in ``out/run.json``.
    out:
        The run directory (default ``runs/<timestamp>``).
    force:
        Start a new run in a folder that holds another one; its files are moved to
        ``out/history/`` first.
    resume:
        Finish the run recorded in ``out`` with its recorded settings: finished stages are
        reused, the activations go on from the last finished batch.  (A run with the same
        settings into the same ``out`` does the same.)
    progress:
        Show progress bars.
    stop_after:
        ``"contexts"`` to collect and save the contexts only (``neuronprobe contexts``), or
        ``"activations"`` to stop after recording them (``neuronprobe activations``); a later
        run with the same ``--out`` and settings reuses what is there.

    Returns
    -------
    RunResult
        The run directory, the neuron and layer tables, ``run.json``'s content and the figures
        (for a finished run that this call reads back, drawn again from its tables).
    """
    if stop_after not in (None, "contexts", "activations"):
        raise ValueError(
            f"stop_after must be None, 'contexts' or 'activations', got {stop_after!r}"
        )
    if resume and force:
        raise NeuronprobeError(
            "--resume finishes the run in --out and --force replaces it; choose one."
        )
    if resume:
        if out is None:
            raise NeuronprobeError("--resume needs --out RUN_DIR: the run to finish.")
        config = resumed_config(Path(out), config)
    config = config or RunConfig()
    directory = Path(out) if out is not None else default_out()
    with rundir.locked(directory):
        earlier = open_run_directory(directory, config, force=force, resume=resume)
        finished, damaged = usable_stages(directory, earlier) if earlier else (set(), {})
        for stage, problem in damaged.items():
            logger.warning("%s: recomputing the %s stage and those after it", problem, stage)
        # Cheap input checks (the corpus, the model's name and the device) before any heavy
        # import or work.
        corpus = None
        if "contexts" not in finished:
            corpus = open_corpus(config.corpus, text_column=config.text_column)
        if _model_needed(config, finished, stop_after):
            check_model(config.model, device=config.device)
        if stop_after is None and "decoding" not in finished and config.decoding:
            if earlier is not None and "contexts" in finished:
                per_class, source = int(earlier["counts"]["kept_per_class"]), "the run has"
            else:
                per_class = config.min_per_class
                source = f"--min-per-class {config.min_per_class} may collect only"
            check_decode_cv(config.decode_cv, per_class, source)
        record = _start_record(config, earlier, finished)
        earlier_record = _read_bytes(directory / rundir.RUN_JSON)
        with _executor(config, finished, stop_after):
            # The model before anything is written: a bad --model, site, layer or target is
            # refused without a trace, and its tokenizer defines the contexts.
            loaded, layers = _model_stage(config, record, finished, stop_after)
            logger.info("run directory: %s", directory)
            rundir.write_json(directory / rundir.RUN_JSON, record)
            try:
                with _marked_if_stopped(record, directory):
                    contexts, activations = _contexts_and_activations(
                        config,
                        corpus,
                        loaded,
                        layers,
                        directory,
                        record,
                        finished,
                        progress,
                        stop_after,
                    )
            except NeuronprobeError:
                if "complete" not in record["stages"].values():
                    # Bad input found by the scan (too few contexts...): like every other bad
                    # input, it leaves nothing behind, and an earlier run.json as it was.
                    _restore(directory / rundir.RUN_JSON, earlier_record)
                raise
        if stop_after is not None:
            return _finish(directory, record)
        with _marked_if_stopped(record, directory):
            return _statistics_and_report(
                config,
                contexts,
                activations,
                layers,
                directory,
                record,
                finished,
                progress,
                loaded,
            )


def _read_bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _restore(path: Path, data: bytes | None) -> None:
    """Put back the bytes ``path`` held before (``None``: it did not exist)."""
    if data is None:
        path.unlink(missing_ok=True)
    else:
        with rundir.atomic_path(path) as temporary:
            temporary.write_bytes(data)


def _executor(
    config: RunConfig, finished: set[str], stop_after: str | None
) -> contextlib.AbstractContextManager[Any]:
    """With ``--executor ray`` and a heavy stage to run, a Ray session (joined or started) for
    the block: an unreachable ``--ray-address`` fails here, before the model loads."""
    if config.executor != "ray" or not _heavy_stage_left(finished, stop_after):
        return contextlib.nullcontext()
    from neuronprobe.distributed import ray_session

    return ray_session(config.ray_address)


@contextmanager
def _marked_if_stopped(record: dict[str, Any], directory: Path) -> Iterator[None]:
    """On any exception, mark the run and its running stage failed or interrupted, then re-raise.

    ``run.json`` must never claim that a run which stopped half-way is complete.
    """
    try:
        yield
    except BaseException as error:
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        record["status"] = status
        for stage, state in record["stages"].items():
            if state == "running":
                record["stages"][stage] = status
        record["error"] = f"{type(error).__name__}: {error}"
        rundir.write_json(directory / rundir.RUN_JSON, record)
        raise


def resumed_config(directory: Path, config: RunConfig | None = None) -> RunConfig:
    """The settings recorded in ``directory/run.json``; ``config`` may differ only in
    :data:`~neuronprobe.config.RESUMABLE_CHANGES`."""
    record = read_record(directory)
    if not isinstance(record.get("config"), dict):
        raise NeuronprobeError(
            f"--resume: {directory / rundir.RUN_JSON} records no config; it was not written "
            "by `neuronprobe run`."
        )
    recorded = RunConfig.from_dict(record["config"])
    if config is None:
        return recorded
    given = _comparable(config.to_dict(), record)
    settings = _comparable(record["config"], record)
    changed = _differences(settings, given, [n for n in settings if n not in RESUMABLE_CHANGES])
    if changed:
        raise NeuronprobeError(
            f"--resume finishes the run with its recorded settings, but they differ "
            f"({'; '.join(changed)}); drop those settings, use `neuronprobe probe` for other "
            "statistics settings, or start a new --out."
        )
    return dataclasses.replace(
        recorded, **{name: getattr(config, name) for name in RESUMABLE_CHANGES}
    )


def _start_record(
    config: RunConfig, earlier: dict[str, Any] | None, finished: set[str]
) -> dict[str, Any]:
    """``run.json`` at the start: a new one, or the earlier run's with its finished stages."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    record: dict[str, Any] = {"status": "running", "stages": {}, "started": now}
    if earlier is not None:
        kept = (
            "started",
            "model",
            "contrast",
            "corpus",
            "counts",
            "activations",
            "statistics",
            "behavior",
            "interventions",
            "decoding",
        )
        record.update({key: earlier[key] for key in kept if key in earlier})
        record["resumed"] = [*earlier.get("resumed", []), now]
        record["stages"] = dict.fromkeys(
            (stage for stage in earlier.get("stages", {}) if stage in finished), "complete"
        )
        if "statistics" in finished:
            record["stages"]["figures"] = "complete"
    timings = dict(earlier.get("timings_s", {})) if earlier else {}
    record.update(config=config.to_dict(), seed=config.seed, versions=versions(), timings_s=timings)
    return record


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)
    logger.info("%s done in %.1f s", name, timings[name])


@contextmanager
def _stage(record: dict[str, Any], directory: Path, name: str) -> Iterator[None]:
    """Mark stage ``name`` running in ``run.json``, time it, and mark it complete."""
    record["stages"][name] = "running"
    rundir.write_json(directory / rundir.RUN_JSON, record)
    with _timed(record["timings_s"], name):
        yield
    record["stages"][name] = "complete"
    rundir.write_json(directory / rundir.RUN_JSON, record)


def _heavy_stage_left(finished: set[str], stop_after: str | None) -> bool:
    """Whether the contexts or the activations are still to be made (they need the model)."""
    if stop_after == "contexts":
        return "contexts" not in finished
    return "activations" not in finished


def _model_needed(config: RunConfig, finished: set[str], stop_after: str | None) -> bool:
    """Whether a stage still to run needs the model: the contexts, the activations, or the
    interventions (which run it again with neurons changed)."""
    if _heavy_stage_left(finished, stop_after):
        return True
    return (
        stop_after is None and "interventions" not in finished and _no_interventions(config) is None
    )


def _no_interventions(config: RunConfig) -> str | None:
    """Why this run does no interventions, or None when it does."""
    if not config.interventions:
        return "--no-interventions"
    if config.position != -1:
        # The neurons were read at another token: changing them at the last one would test
        # something the statistics did not find.
        return (
            f"--position {config.position}: the interventions change neurons at the last token, "
            "where this run did not read them"
        )
    return None


def _model_stage(
    config: RunConfig, record: dict[str, Any], finished: set[str], stop_after: str | None
) -> tuple[LoadedModel | None, list[int]]:
    """Load the model if a stage still to run needs it, and check the settings that depend on it.

    Returns the model (None when the contexts and activations are reused) and the layers to
    record; fills ``record``'s ``model`` and ``contrast``.
    """
    loaded = None
    if _model_needed(config, finished, stop_after):
        with _timed(record["timings_s"], "model"):
            loaded = load_model(config.model, device=config.device, dtype=config.dtype)
            n_layers = len(hook_points(loaded.model, config.site))
            layers = resolve_layers(config.layers, n_layers)
            contrast_ids = resolve_contrast(config.contrast, loaded.tokenizer)
            if stop_after is None and _no_interventions(config) is None:
                check_ablate_k(config.ablate_k, site_width(loaded.model, config.site))
            if stop_after is None and _no_decoding(config) is None:
                check_decode_k(config.decode_k, site_width(loaded.model, config.site))
        record["model"] = {**loaded.identity, "layers": n_layers}
        record["contrast"] = {
            **config.contrast.__dict__,
            "description": config.contrast.describe(),
            "target_id": contrast_ids.target_id,
            "positive_ids": [list(ids) for ids in contrast_ids.positive_sequences],
            "negative_ids": [list(ids) for ids in contrast_ids.negative_sequences],
            "excluded_ids": sorted(contrast_ids.excluded_ids),
        }
    else:
        layers = list(record.get("activations", {}).get("layers", config.layers or []))
        shape = record.get("activations", {}).get("shape")
        decoding_left = "decoding" not in finished and _no_decoding(config) is None
        if stop_after is None and decoding_left and shape:
            check_decode_k(config.decode_k, int(shape[2]))
    if layers and stop_after is None:
        config.resolved_figure_layer(layers, record.get("model", {}).get("layers"))  # or refuse
    return loaded, layers


def _contexts_and_activations(
    config: RunConfig,
    corpus: Corpus | None,
    loaded: LoadedModel | None,
    layers: list[int],
    directory: Path,
    record: dict[str, Any],
    finished: set[str],
    progress: bool,
    stop_after: str | None,
) -> tuple[Contexts, np.ndarray | None]:
    """The heavy stages, each done here or reused: the contexts, then (unless ``stop_after``
    is ``"contexts"``) the activations, float32 [layers, contexts, neurons], memory-mapped."""
    if finished:
        logger.info(
            "continuing the run in %s: reusing its %s",
            directory,
            ", ".join(stage for stage in STAGES if stage in finished),
        )
    on_ray = config.executor == "ray"

    if "contexts" in finished:
        logger.info("reusing the contexts in %s", directory / rundir.CONTEXTS)
        contexts = load_contexts(directory / rundir.CONTEXTS)
    else:
        assert loaded is not None and corpus is not None
        with _stage(record, directory, "contexts"):
            choices: dict[str, Any] = {
                "min_per_class": config.min_per_class,
                "seed": config.seed,
                "drop_duplicates": config.drop_duplicates,
                "normalize_apostrophes": config.normalize_apostrophes,
                "progress": progress,
            }
            if on_ray:
                from neuronprobe.distributed import collect_contexts_ray

                contexts = collect_contexts_ray(
                    corpus,
                    loaded.tokenizer,
                    config.contrast,
                    workers=config.ray_workers,
                    **choices,
                )
            else:
                documents = corpus.documents()
                contexts = collect_contexts(documents, loaded.tokenizer, config.contrast, **choices)
            save_contexts(contexts, directory / rundir.CONTEXTS, loaded.tokenizer, config.contrast)
            record["corpus"] = corpus.identity()
            record["counts"] = {**contexts.counts, "contexts": len(contexts)}
    if stop_after == "contexts":
        return contexts, None

    if "activations" in finished:
        logger.info("reusing the activations in %s", directory / rundir.ACTIVATIONS)
        _add_model_answer(directory)
        return contexts, np.load(directory / rundir.ACTIVATIONS, mmap_mode="r")
    assert loaded is not None
    with _stage(record, directory, "activations"):
        path = directory / rundir.ACTIVATIONS
        where: dict[str, Any] = {
            "identity": loaded.identity,
            "layers": layers,
            "site": config.site,
            "position": config.position,
            "batch_size": config.batch_size,
            "progress": progress,
            "positive_ids": positive_first_ids(record),
        }
        if on_ray:
            from neuronprobe.distributed import extract_to_file_ray

            activations = extract_to_file_ray(
                config.model,
                contexts.tokens,
                path,
                model=loaded.model,
                device=config.device,
                dtype=config.dtype,
                num_actors=config.ray_workers,
                num_gpus_per_actor=config.ray_gpus_per_worker,
                **where,
            )
        else:
            activations = extract_to_file(loaded.model, contexts.tokens, path, **where)
        record["activations"] = {
            "file": rundir.ACTIVATIONS,
            "shape": list(activations.shape),
            "dtype": "float32",
            "axes": ["layer", "context", "neuron"],
            "layers": layers,
            "site": config.site,
            "position": config.position,
            "positive_first_ids": positive_first_ids(record),
        }
        _add_model_answer(directory)
    return contexts, activations


def positive_first_ids(record: dict[str, Any]) -> list[int]:
    """The first tokens of the positive followers (``run.json``'s ``contrast.positive_ids``):
    the tokens whose total probability at the last token is the model's own answer."""
    return sorted({int(ids[0]) for ids in record["contrast"]["positive_ids"] if ids})


def _add_model_answer(directory: Path) -> None:
    """Add the model's own answer, stored beside the activations, to ``contexts.parquet``:
    ``logprob_positive`` (log P of the positive followers' first tokens at the last token) and
    ``logodds_positive`` (log P - log(1 - P)). Nothing to add for activations recorded
    without it (run directories from before it existed)."""
    from neuronprobe.activations import load_logprob, logodds

    logprob = load_logprob(directory / rundir.ACTIVATIONS)
    if logprob is None:
        return
    table = pd.read_parquet(directory / rundir.CONTEXTS)
    answer = {"logprob_positive": logprob[:, 0], "logodds_positive": logodds(logprob)}
    if all(
        name in table and np.array_equal(table[name].to_numpy(), values)
        for name, values in answer.items()
    ):
        return
    for name, values in answer.items():
        table[name] = values
    with rundir.atomic_path(directory / rundir.CONTEXTS) as temporary:
        table.to_parquet(temporary, index=False)


def model_logodds(directory: Path) -> np.ndarray | None:
    """``logodds_positive`` of every context (``contexts.parquet``), or None where the run
    recorded no model answer."""
    table = pd.read_parquet(directory / rundir.CONTEXTS)
    if "logodds_positive" not in table:
        return None
    return table["logodds_positive"].to_numpy(dtype=np.float64)


def _statistics_and_report(
    config: RunConfig,
    contexts: Contexts,
    activations: np.ndarray | None,
    layers: list[int],
    directory: Path,
    record: dict[str, Any],
    finished: set[str],
    progress: bool,
    loaded: LoadedModel | None = None,
) -> RunResult:
    """The statistics, tables and figures (or the finished ones), the interventions, the
    decoding, then the report."""
    outputs: tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]
    if "statistics" in finished:
        logger.info("reusing the statistics in %s", directory / rundir.NEURONS)
        neurons = rundir.read_neurons(directory)
        layers_profile = pd.read_csv(directory / rundir.LAYERS)
        # The same figures as figures/ holds, drawn again from the tables (not saved).
        figures = make_figures(config, neurons, layers_profile, _figure_layer(config, record))
        outputs = (neurons, layers_profile, figures)
    else:
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
    if activations is None and not {"interventions", "decoding"} <= finished:
        activations = np.load(directory / rundir.ACTIVATIONS, mmap_mode="r")
    if "interventions" not in finished:
        _interventions_stage(
            config, loaded, contexts, activations, layers, directory, record, progress
        )
    if "decoding" not in finished:
        _decoding_stage(config, contexts, activations, layers, directory, record)
    result = _finish(directory, record)
    if "report" not in finished:
        _report(directory, record)
    result.neurons, result.layers, result.figures = outputs
    return result


def _interventions_stage(
    config: RunConfig,
    loaded: LoadedModel | None,
    contexts: Contexts,
    activations: Any,
    layers: list[int],
    directory: Path,
    record: dict[str, Any],
    progress: bool,
) -> None:
    """Change the strongest significant neurons of each layer (and random ones, the control) at
    the last token of the held-out contexts and record the model's own prediction:
    ``interventions.parquet``, ``figures/interventions``, ``run.json``'s ``interventions``."""
    with _stage(record, directory, "interventions"):
        reason = _no_interventions(config)
        if reason is not None:
            logger.info("no interventions: %s", reason)
            record["interventions"] = {"skipped": reason}
            return
        assert loaded is not None, "the interventions need the model"
        from neuronprobe.figures import interventions_figure, save_figure
        from neuronprobe.interventions import intervention_sweep

        split = pd.read_csv(directory / rundir.SPLIT)["split"].to_numpy()
        table = intervention_sweep(
            loaded.model,
            contexts.tokens,
            contexts.labels,
            split == "train",
            activations,
            layers,
            rundir.read_neurons(directory),
            positive_ids=positive_first_ids(record),
            site=config.site,
            test=config.test,
            ablation=config.ablation,
            ablate_k=config.ablate_k,
            random_draws=config.random_draws,
            seed=config.seed,
            batch_size=config.batch_size,
            progress=progress,
        )
        with rundir.atomic_path(directory / rundir.INTERVENTIONS) as temporary:
            table.to_parquet(temporary, index=False)
        figures = []
        if len(table):
            contrast = record["contrast"]
            figure = interventions_figure(
                table,
                positive=str(contrast.get("positive_name", "positive")),
                negative=str(contrast.get("negative_name", "negative")),
            )
            save_figure(figure, directory / rundir.FIGURES / "interventions")
            figures.append("interventions")
        else:  # no layer has a significant neuron: nothing to draw (the report says so)
            for stale in (directory / rundir.FIGURES).glob("interventions.*"):
                stale.unlink()
        record["interventions"] = {
            "file": rundir.INTERVENTIONS,
            "rows": len(table),
            "ablation": config.ablation,
            "ablate_k": list(config.ablate_k),
            "random_draws": config.random_draws,
            "site": config.site,
            "seed": config.seed,
            "contexts": int((split == "test").sum()),
            "position": "the last token",
            "figures": figures,
            "inputs_sha256": intervention_inputs(directory, layers, config.test),
        }


def intervention_inputs(directory: Path, layers: list[int], test: str) -> str:
    """What the interventions chose from: the split and each layer's significant neurons in
    their order (:func:`neuronprobe.tables.top_neurons`), as one SHA-256 (``run.json``'s
    ``interventions.inputs_sha256``). A refit that keeps both keeps the interventions."""
    import hashlib

    from neuronprobe.tables import top_neurons

    neurons = rundir.read_neurons(directory)
    ranked = {
        str(layer): top_neurons(neurons[neurons["layer"] == layer], len(neurons), test=test)[
            "neuron"
        ].tolist()
        for layer in layers
    }
    digest = hashlib.sha256((directory / rundir.SPLIT).read_bytes())
    digest.update(json.dumps(ranked).encode())
    return digest.hexdigest()


def _keep_or_drop_interventions(
    directory: Path,
    record: dict[str, Any],
    earlier: dict[str, Any] | None,
    whole: bool,
    config: RunConfig,
) -> None:
    """After a refit: the interventions stay when they were whole and the refit kept the split
    and the significant neurons they chose from; otherwise they go (a copy is in the refit's
    history/ folder) and ``neuronprobe intervene`` redoes them."""
    if earlier is None:
        return
    layers = list(record["activations"]["layers"])
    done = "figures" in earlier
    if whole and (
        not done
        or earlier.get("inputs_sha256") == intervention_inputs(directory, layers, config.test)
    ):
        record["interventions"] = earlier  # still right (or skipped, and skipped still)
        record["stages"]["interventions"] = "complete"
        return
    if not done:
        return
    interventions = {"interventions": earlier}
    stale = [
        rundir.INTERVENTIONS,
        *rundir.figure_files(directory, interventions, ("interventions",)),
    ]
    for name in stale:
        (directory / name).unlink(missing_ok=True)
    logger.warning(
        "the refit changed the split or the significant neurons that the interventions chose "
        "from: they are kept in history/ only; `neuronprobe intervene --out %s` redoes them",
        directory,
    )


def intervene(
    out: Path | str,
    *,
    progress: bool = False,
    device: str | None = None,
    batch_size: int | None = None,
    **changes: Any,
) -> RunResult:
    """(Re)do the interventions of a finished run: ``neuronprobe intervene --out RUN_DIR``.

    Reads ``run.json``, the contexts, activations, neuron table and split of ``out``, applies
    ``changes`` (any of :data:`~neuronprobe.config.INTERVENTION_SETTINGS`: ``ablation``,
    ``ablate_k``, ``random_draws``), loads the run's model and writes
    ``interventions.parquet``, ``figures/interventions`` and the report again; earlier
    interventions are first copied to ``history/<time>-intervene/``.
    """
    directory = Path(out)
    record = read_record(directory)
    require_stage(directory, record, "statistics")
    unknown = sorted(set(changes) - set(INTERVENTION_SETTINGS))
    if unknown:
        raise NeuronprobeError(
            f"intervene cannot change {', '.join(unknown)}: only {', '.join(INTERVENTION_SETTINGS)}."
        )
    config = RunConfig.from_dict({**record["config"], **changes, "interventions": True})
    config = dataclasses.replace(
        config,
        device=device if device is not None else config.device,
        batch_size=batch_size if batch_size is not None else config.batch_size,
    )
    reason = _no_interventions(config)
    if reason is not None:
        raise NeuronprobeError(f"this run cannot do interventions: {reason}.")
    check_ablate_k(config.ablate_k, int(record["activations"]["shape"][2]))
    check_model(config.model, device=config.device)
    with rundir.locked(directory):
        loaded = load_model(config.model, device=config.device, dtype=config.dtype)
        recorded = record.get("model", {}).get("weights_sha256")
        if recorded and loaded.identity.get("weights_sha256") not in (None, recorded):
            raise NeuronprobeError(
                f"--model {config.model} does not hold the weights this run recorded "
                f"(sha256 {recorded[:12]}...); the interventions must use the same model."
            )
        if (directory / rundir.INTERVENTIONS).exists():  # the earlier ones, kept
            _archive(
                directory,
                record,
                "intervene",
                (rundir.INTERVENTIONS, rundir.FIGURES, rundir.REPORT),
            )
        contexts = load_contexts(directory / rundir.CONTEXTS)
        activations = np.load(directory / rundir.ACTIVATIONS, mmap_mode="r")
        record["config"] = config.to_dict()
        record["status"] = "running"
        record.pop("error", None)
        record["stages"].pop("report", None)
        layers = list(record["activations"]["layers"])
        with _marked_if_stopped(record, directory):
            _interventions_stage(
                config, loaded, contexts, activations, layers, directory, record, progress
            )
        result = _finish(directory, record)
        _report(directory, record)
    result.neurons = rundir.read_neurons(directory)
    result.layers = pd.read_csv(directory / rundir.LAYERS)
    return result


def _no_decoding(config: RunConfig) -> str | None:
    """Why this run does no decoding, or None when it does."""
    return None if config.decoding else "--no-decoding"


def _statistics_seed(config: RunConfig) -> int:
    """The seed of the split, the folds and the shuffled labels: ``statistics_seed`` if set
    (a refit's ``--seed``), else the run's ``seed``."""
    return config.seed if config.statistics_seed is None else config.statistics_seed


def decoding_inputs(
    config: RunConfig, labels: Any, document_ids: list[str], k: list[str], layers: list[int]
) -> str:
    """What decides the decoding, as one SHA-256 (``run.json``'s ``decoding.inputs_sha256``).

    The labels, the documents (where ``split_by_document`` keeps each in one fold), the test and
    alpha that rank the neurons, the seed of the folds and shuffled labels, the probe sizes
    ``k``, the folds, the penalty, the shuffled-label control and the layers. A refit that keeps
    all of them keeps the decoding.
    """
    import hashlib

    settings = {
        "groups": [str(document) for document in document_ids]
        if config.split_by_document
        else None,
        "test": config.test,
        "alpha": config.alpha,
        "seed": _statistics_seed(config),
        "k": list(k),
        "cv": config.decode_cv,
        "C": DECODE_C,
        "shuffled_control": config.shuffled_control,
        "layers": [int(layer) for layer in layers],
    }
    digest = hashlib.sha256(np.asarray(labels, dtype=bool).tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def _decode_table(
    config: RunConfig,
    contexts: Contexts,
    activations: Any,
    layers: list[int],
    directory: Path,
    *,
    in_run: bool = True,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Decode every layer of the stored activations (read one layer at a time).

    Returns the table (``decoding.csv``) and ``run.json``'s ``decoding`` entry without its
    figures; writes nothing, so bad settings are refused (one line) before anything changes.
    ``in_run``: the error names the run's options (``--decode-cv``, ``--no-decoding``) and
    ``neuronprobe decode`` as the way to redo the decoding alone.
    """
    from neuronprobe.decoding import DecodingInputError, decode_layers

    k = check_decode_k(config.decode_k, int(activations.shape[2]))
    labels = np.asarray(contexts.labels, dtype=bool)
    per_class = int(min(labels.sum(), (~labels).sum()))
    check_decode_cv(config.decode_cv, per_class, "the run has", in_run=in_run)
    seed = _statistics_seed(config)
    groups = np.asarray(contexts.document_ids) if config.split_by_document else None
    start = time.perf_counter()
    try:
        table = decode_layers(
            activations,
            labels,
            k=decode_k_sizes(k),
            cv=config.decode_cv,
            seed=seed,
            groups=groups,
            C=DECODE_C,
            shuffled_control=config.shuffled_control,
            test=config.test,
            alpha=config.alpha,
            layers=layers,
        )
    except DecodingInputError as error:
        if not in_run:
            raise
        raise NeuronprobeError(
            f"decoding: {error} (The decoding's folds are --decode-cv; `neuronprobe decode "
            f"--out {directory} --cv K` redoes the decoding alone.)"
        ) from error
    settings = {
        "file": rundir.DECODING,
        "rows": len(table),
        "layers": [int(layer) for layer in layers],
        "k": k,
        "cv": config.decode_cv,
        "C": DECODE_C,
        "seed": seed,
        "test": config.test,
        "alpha": config.alpha,
        "grouped": config.split_by_document,
        "shuffled_control": config.shuffled_control,
        "seconds": round(time.perf_counter() - start, 3),
        "inputs_sha256": decoding_inputs(config, labels, contexts.document_ids, k, layers),
    }
    logger.info(
        "decoded %d layers (k %s, %d folds) in %.1f s",
        len(layers),
        ",".join(k),
        config.decode_cv,
        settings["seconds"],
    )
    return table, settings


def _model_auc(record: dict[str, Any]) -> float | None:
    """The model's own held-out AUC (``run.json``'s ``behavior.auc``), or None."""
    auc = record.get("behavior", {}).get("auc")
    return None if auc is None else float(auc)


def _save_decoding_figure(directory: Path, table: pd.DataFrame, model_auc: float | None) -> None:
    """``figures/decoding`` (PNG and SVG) from the decoding table."""
    import matplotlib.pyplot as plt

    from neuronprobe.figures import decoding_figure, save_figure

    figure = decoding_figure(table, model_auc=model_auc)
    save_figure(figure, directory / rundir.FIGURES / "decoding")
    plt.close(figure)


def _decoding_stage(
    config: RunConfig,
    contexts: Contexts,
    activations: Any,
    layers: list[int],
    directory: Path,
    record: dict[str, Any],
    computed: tuple[pd.DataFrame, dict[str, Any]] | None = None,
) -> None:
    """Cross-validated probes on the ``k`` strongest neurons of each layer and on the whole
    layer (:func:`neuronprobe.decoding.decode_layers`): ``decoding.csv``,
    ``figures/decoding``, ``run.json``'s ``decoding``. ``computed``: the table and entry of
    :func:`_decode_table`, when the caller decoded before writing anything (its time is then
    added to the stage's in ``timings_s``)."""
    decoded_before = computed is not None
    with _stage(record, directory, "decoding"):
        reason = _no_decoding(config)
        if reason is not None:
            logger.info("no decoding: %s", reason)
            record["decoding"] = {"skipped": reason}
            # Files of an earlier decoding that run.json no longer describes (kept in history/).
            for stale in (
                directory / rundir.DECODING,
                *(directory / rundir.FIGURES).glob("decoding.*"),
            ):
                stale.unlink(missing_ok=True)
            return
        if computed is None:
            computed = _decode_table(config, contexts, activations, layers, directory)
        table, settings = computed
        with rundir.atomic_path(directory / rundir.DECODING) as temporary:
            table.to_csv(temporary, index=False)
        model_auc = _model_auc(record)
        _save_decoding_figure(directory, table, model_auc)
        record["decoding"] = {**settings, "model_auc": model_auc, "figures": ["decoding"]}
    if decoded_before and "seconds" in record["decoding"]:
        timings = record["timings_s"]
        timings["decoding"] = round(timings["decoding"] + record["decoding"]["seconds"], 3)


def _keep_or_redo_decoding(
    config: RunConfig,
    contexts: Contexts,
    activations: Any,
    layers: list[int],
    directory: Path,
    record: dict[str, Any],
    earlier: dict[str, Any] | None,
    computed: tuple[pd.DataFrame, dict[str, Any]] | None,
) -> None:
    """After a refit: the decoding stays when ``computed`` is None (see
    :func:`_decoding_to_redo`), its figure redrawn if the model's own AUC it shows changed with
    the split; otherwise it is written from ``computed`` (the earlier one is in history/)."""
    if computed is None and earlier is not None:
        record["decoding"] = earlier
        model_auc = _model_auc(record)
        if "figures" in earlier and earlier.get("model_auc") != model_auc:
            table = pd.read_csv(directory / rundir.DECODING, dtype={"k": str})
            table["selected"] = table["selected"].fillna("")
            _save_decoding_figure(directory, table, model_auc)
            earlier["model_auc"] = model_auc
        record["stages"]["decoding"] = "complete"
        return
    if computed is not None:
        logger.info(
            "the refit changed what the decoding depends on (the test, alpha, seed, folds or "
            "documents): decoding again; the earlier one is kept in history/"
        )
    _decoding_stage(config, contexts, activations, layers, directory, record, computed)


def _decoding_to_redo(
    config: RunConfig,
    contexts: Contexts,
    activations: Any,
    layers: list[int],
    directory: Path,
    earlier: dict[str, Any] | None,
) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """For a refit: None when the earlier decoding (``earlier``, whole, or None) still holds
    (its inputs unchanged, or skipped and still skipped), else the new table and entry (see
    :func:`_decode_table`; nothing is written)."""
    if _no_decoding(config) is not None:
        return None
    if earlier is not None and "inputs_sha256" in earlier:
        k = check_decode_k(config.decode_k, int(activations.shape[2]))
        inputs = decoding_inputs(config, contexts.labels, contexts.document_ids, k, layers)
        if earlier["inputs_sha256"] == inputs:
            return None
    return _decode_table(config, contexts, activations, layers, directory)


def decode(out: Path | str, *, progress: bool = False, **changes: Any) -> RunResult:
    """(Re)do the decoding of a finished run from its stored activations (no model needed):
    ``neuronprobe decode --out RUN_DIR``.

    Reads ``run.json``, the contexts and ``activations.npy`` of ``out``, applies ``changes``
    (``decode_k``, ``decode_cv``; see :data:`~neuronprobe.config.DECODING_SETTINGS`), decodes
    every layer (:func:`neuronprobe.decoding.decode_layers`, with the run's labels, seed, test,
    alpha and documents) and writes ``decoding.csv``, ``figures/decoding``, ``run.json`` and
    the report again; an earlier decoding is first copied to ``history/<time>-decode/``.
    ``progress`` is accepted as :func:`intervene`'s is; the decoding shows no progress bar.
    Bad settings and a run without its activations are refused in one line, before anything
    is written.
    """
    del progress  # the decoding logs its layers, it draws no bar
    directory = Path(out)
    record = read_record(directory)
    require_stage(directory, record, "statistics")
    allowed = tuple(name for name in DECODING_SETTINGS if name != "decoding")
    unknown = sorted(set(changes) - set(allowed))
    if unknown:
        raise NeuronprobeError(
            f"decode cannot change {', '.join(unknown)}: only {', '.join(allowed)}."
        )
    config = RunConfig.from_dict({**record["config"], **changes, "decoding": True})
    layers = list(record["activations"]["layers"])
    with rundir.locked(directory):
        contexts = load_contexts(directory / rundir.CONTEXTS)
        activations = np.load(directory / rundir.ACTIVATIONS, mmap_mode="r")
        computed = _decode_table(config, contexts, activations, layers, directory, in_run=False)
        if (directory / rundir.DECODING).exists():  # the earlier one, kept
            _archive(directory, record, "decode", (rundir.DECODING, rundir.FIGURES, rundir.REPORT))
        record["config"] = config.to_dict()
        record["status"] = "running"
        record.pop("error", None)
        record["stages"].pop("report", None)
        with _marked_if_stopped(record, directory):
            _decoding_stage(config, contexts, activations, layers, directory, record, computed)
        result = _finish(directory, record)
        _report(directory, record)
    result.neurons = rundir.read_neurons(directory)
    result.layers = pd.read_csv(directory / rundir.LAYERS)
    return result


def _report(directory: Path, record: dict[str, Any]) -> None:
    """The last stage: ``report.html`` from the finished run directory's files."""
    from neuronprobe.report import write_report

    with _stage(record, directory, "report"):
        write_report(directory)


def report(out: Path | str) -> Path:
    """Write (or rewrite) ``report.html`` of a finished run directory (``neuronprobe report``).

    Returns
    -------
    Path
        The report's path.
    """
    from neuronprobe.report import write_report

    directory = Path(out)
    record = read_record(directory)
    require_stage(directory, record, "statistics")
    with rundir.locked(directory):
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
    Writes ``split.csv`` (the split the fits used) and, where the contexts hold the model's
    own answer, its held-out performance (``record["behavior"]``) and each neuron's
    correlation with it (``behavior_corr``).
    """
    from neuronprobe.behavior import behavior_correlation, behavior_summary
    from neuronprobe.figures import save_figure
    from neuronprobe.statistics import fit_neuron_logits
    from neuronprobe.tables import layer_table, neuron_table

    timings: dict[str, float] = record["timings_s"]
    seed = _statistics_seed(config)
    record["stages"].update(statistics="running", figures="running")
    record["stages"].pop("report", None)
    rundir.write_json(directory / rundir.RUN_JSON, record)
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
        logodds = model_logodds(directory)
        record.pop("behavior", None)
        if logodds is not None:
            held_out = ~fits.train_mask
            # neuron_table's rows are layer-major: [layers, neurons] flattened.
            neurons["behavior_corr"] = behavior_correlation(activations, logodds, held_out).reshape(
                -1
            )
            record["behavior"] = {
                **behavior_summary(logodds, np.asarray(labels, dtype=bool), fits.train_mask),
                "measure": "logodds_positive",
                "positive_first_ids": positive_first_ids(record),
            }
        layers_profile = layer_table(neurons)
        split = pd.DataFrame(
            {
                "context": np.arange(len(fits.train_mask), dtype=np.int64),
                "split": np.where(fits.train_mask, "train", "test"),
            }
        )
        with rundir.atomic_path(directory / rundir.SPLIT) as temporary:
            split.to_csv(temporary, index=False)
        with rundir.atomic_path(directory / rundir.NEURONS) as temporary:
            neurons.to_parquet(temporary, index=False)
        with rundir.atomic_path(directory / rundir.NEURONS_CSV) as temporary:
            neurons.to_csv(temporary, index=False)
        with rundir.atomic_path(directory / rundir.LAYERS) as temporary:
            layers_profile.to_csv(temporary, index=False)
    figure_layer = _figure_layer(config, record)
    record["statistics"] = {
        "model": "L1-penalised logistic regression per neuron (statsmodels' objective, exact "
        "optimum)",
        "engine": config.engine,
        "alpha": config.alpha,
        "train_contexts": int(fits.train_mask.sum()),
        "test_contexts": int((~fits.train_mask).sum()),
        "split_file": rundir.SPLIT,
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
        "pvalue_threshold": float(neurons["pvalue_threshold"].iloc[0]),
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
        "figure_layer": figure_layer,
    }

    with _timed(timings, "figures"):
        figures = make_figures(config, neurons, layers_profile, figure_layer)
        for name, figure in figures.items():
            save_figure(figure, directory / rundir.FIGURES / name)
    record["statistics"]["figures"] = sorted(figures)
    record["stages"].update(activations="complete", statistics="complete", figures="complete")
    return neurons, layers_profile, figures


def _figure_layer(config: RunConfig, record: dict[str, Any]) -> int:
    """The per-neuron figures' layer, among the layers ``record`` says were recorded."""
    return config.resolved_figure_layer(
        list(record["activations"]["layers"]), record.get("model", {}).get("layers")
    )


def make_figures(
    config: RunConfig, neurons: pd.DataFrame, layers_profile: pd.DataFrame, figure_layer: int
) -> dict[str, Any]:
    """The run's figures (matplotlib ``Figure`` objects, by file name) from its tables.

    The notebook's three (``neurons_layer{L}``, ``accuracy_layer{L}``, ``layers``) and, where
    the tables hold the shuffled-label control, ``control``. pyplot does not keep them: the
    caller owns them (a long session would otherwise pile them up).
    """
    import matplotlib.pyplot as plt

    from neuronprobe.figures import accuracy_figure, control_figure, layers_figure, neuron_figure

    pvalue = "pvalue" if config.test == "wald" else "pvalue_lr"
    figures = {
        f"neurons_layer{figure_layer}": neuron_figure(
            neurons, figure_layer, config.contrast.negative_name, pvalue=pvalue
        ),
        f"accuracy_layer{figure_layer}": accuracy_figure(neurons, figure_layer),
        "layers": layers_figure(layers_profile),
    }
    if "percent_significant_shuffled" in layers_profile.columns:
        figures["control"] = control_figure(layers_profile)
    for figure in figures.values():
        plt.close(figure)
    return figures


def probe(out: Path | str, *, progress: bool = False, **changes: Any) -> RunResult:
    """Refit the statistics of a finished run from its stored activations (no model needed).

    ``neuronprobe probe --out RUN_DIR``: reads ``run.json``, ``contexts.parquet`` and
    ``activations.npy`` from ``out``, applies ``changes`` (any of
    :data:`STATISTICS_SETTINGS`: a new alpha, correction, test, seed...), refits every neuron
    and rewrites the tables, figures and ``run.json``.  The tables, figures and ``run.json`` it
    replaces are first copied to ``history/<time>-refit/``: a refit never destroys earlier
    results.  Refuses, in one line, a run whose contexts or activations are missing or damaged.

    ``statistics_seed`` changes the split, folds and shuffled labels but not which contexts
    were sampled (those are in ``contexts.parquet``, drawn with ``seed``).

    The interventions stay if the refit keeps the split and the significant neurons they chose
    from, else they go (``neuronprobe intervene`` redoes them: they need the model). The
    decoding stays if the refit keeps what decides it (:func:`decoding_inputs`: the test,
    alpha, seed, documents...), else it is done again here (it needs no model); bad settings
    for it are refused before anything is written.
    """
    directory = Path(out)
    record = read_record(directory)
    require_stage(directory, record, "activations")
    # Interventions finished and whole: kept if the refit keeps what they chose from.
    interventions_whole = _stage_whole(directory, record, "interventions")
    # The decoding, finished and whole: kept if the refit keeps what decides it, else redone.
    decoding = record.get("decoding") if _stage_whole(directory, record, "decoding") else None
    unknown = sorted(set(changes) - set(STATISTICS_SETTINGS))
    if unknown:
        raise NeuronprobeError(
            f"probe cannot change {', '.join(unknown)}: they decide the contexts or "
            "activations; start a new run instead."
        )
    config = RunConfig.from_dict({**record["config"], **changes})
    layers = list(record["activations"]["layers"])
    _figure_layer(config, record)  # or refuse a --layer that was not recorded
    with rundir.locked(directory):
        contexts = load_contexts(directory / rundir.CONTEXTS)
        activations = np.load(directory / rundir.ACTIVATIONS, mmap_mode="r")
        # Before anything is written: a decoding the refit cannot do is refused untouched.
        decoded = _decoding_to_redo(config, contexts, activations, layers, directory, decoding)
        _archive_statistics(directory, record)
        earlier = record.pop("interventions", None)
        record["stages"].pop("interventions", None)
        record.pop("decoding", None)
        record["stages"].pop("decoding", None)
        record["config"] = config.to_dict()
        record["status"] = "running"
        record["probed"] = datetime.now(UTC).isoformat(timespec="seconds")
        record.pop("error", None)
        with _marked_if_stopped(record, directory):
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
            _keep_or_drop_interventions(directory, record, earlier, interventions_whole, config)
            _keep_or_redo_decoding(
                config, contexts, activations, layers, directory, record, decoding, decoded
            )
        result = _finish(directory, record)
        _report(directory, record)
    result.neurons, result.layers, result.figures = outputs
    return result


def _stage_whole(directory: Path, record: dict[str, Any], stage: str) -> bool:
    """Whether ``run.json`` marks ``stage`` complete and all its files are whole."""
    return record.get("stages", {}).get(stage) == "complete" and all(
        rundir.file_problem(directory, name, record) is None
        for name in stage_files(stage, directory, record)
    )


def read_record(directory: Path) -> dict[str, Any]:
    """``run.json`` of a run directory, or a one-line error naming it."""
    try:
        return rundir.read_json(directory / rundir.RUN_JSON)
    except (OSError, ValueError) as error:
        raise NeuronprobeError(
            f"--out {directory} holds no readable run.json ({error}); name a run directory "
            "written by `neuronprobe run`."
        ) from error


def _archive_statistics(directory: Path, record: dict[str, Any]) -> None:
    """Copy the current tables, figures, interventions, decoding and run.json to
    ``history/<time>-refit/``."""
    if record.get("stages", {}).get("statistics") != "complete":
        return
    _archive(directory, record, "refit", RESULT_FILES)


def _archive(directory: Path, record: dict[str, Any], why: str, names: tuple[str, ...]) -> None:
    """Copy ``names`` (those present) and run.json to ``history/<time>-<why>/``."""
    if not any((directory / name).exists() for name in names):
        return
    target = rundir.history_folder(directory, why)
    # Copied into a temporary folder and renamed: history/ never holds a half-copied entry.
    with rundir.atomic_path(target) as temporary:
        temporary.mkdir()
        for name in names:
            source = directory / name
            if source.is_dir():
                shutil.copytree(source, temporary / name)
            elif source.is_file():
                shutil.copy2(source, temporary / name)
        rundir.write_json(temporary / rundir.RUN_JSON, record)
    logger.info("earlier results kept in %s", target)


def _finish(directory: Path, record: dict[str, Any]) -> RunResult:
    record["status"] = "complete"
    record["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    rundir.write_json(directory / rundir.RUN_JSON, record)
    return RunResult(directory, record)
