"""Stage 6, the report: one self-contained HTML page that a scientist can read without the code.

Entry point: :func:`write_report` (a finished run directory -> ``report.html`` in it). The page
reads only the files of the run directory (``run.json``, ``neurons.parquet``, ``layers.csv``,
``contexts.parquet``, ``activations.npy``, ``interventions.parquet``, ``decoding.csv``,
``figures/*.png``) and says, answer first, how well the model and its neurons tell the classes
apart (effect sizes), which layers carry the distinction, which neurons are strongest, the
contexts that drive them, and why (or how far) to believe it: the shuffled-label controls, the
correction, the caveats.

The file stands alone: figures are embedded as base64 PNG data URIs, the CSS is inline, there is
no script and no link outside the page, and a Content-Security-Policy forbids the browser to
fetch anything. The same run directory gives the same bytes.

The page's markup lives in Jinja2 templates beside this module (``templates/``): the skeleton
``report.html.j2``, its CSS ``report.css``, shared macros ``macros.html.j2``, and one partial per
section, ``sections/<anchor>.html.j2``. This module reads the run directory, decides what to
show (which neurons, which contexts, which sentence fits the numbers) and hands each partial a
plain context; :data:`SECTIONS` lists the sections in order, so a new section is a partial and
a function that returns its context. Every value a template shows is HTML-escaped, with its
``://`` written as ``:&#47;&#47;`` (:func:`_escape`), so corpus text that holds markup, template
syntax or a URL shows as text and never becomes a tag or a link; only a figure's data URI is
marked safe (:func:`_data_uri`).

Four helpers are public because they are the report's decisions: :func:`top_neurons` (which
neurons count as the strongest; from :mod:`neuronprobe.tables`, the order the interventions
use too), :func:`example_contexts` (the contexts that drive a neuron
most and least), :func:`intervention_effects` (whether changing the strongest neurons moves
the model more than changing random neurons of the same layer) and :func:`decoding_summary`
(which layer knows most, how few neurons carry most of it, whether the shuffled-label control
of the probes stays at chance).
"""

from __future__ import annotations

import base64
import functools
import html
import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup

from neuronprobe import rundir
from neuronprobe.config import decode_k_order
from neuronprobe.errors import NeuronprobeError
from neuronprobe.tables import top_neurons

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# The report's decisions
# ----------------------------------------------------------------------------------------------


def example_contexts(
    contexts: pd.DataFrame,
    activations: Any,
    layer_index: int,
    neuron: int,
    k: int,
) -> pd.DataFrame:
    """The ``k`` contexts on which one neuron is most active, and the ``k`` least active.

    Parameters
    ----------
    contexts:
        The run's ``contexts.parquet`` as a DataFrame (one row per context, in the order of the
        activations' context axis): ``text, class, document_id`` are used, ``context, label,
        next_text`` kept where present.
    activations:
        ``[layers, contexts, neurons]`` (``activations.npy``, a memory map is fine: only one
        column is read).
    layer_index:
        The position of the layer in ``run.json``'s ``activations.layers`` (the array's first
        axis), not the model's layer number.
    neuron:
        The neuron's index within the layer.
    k:
        How many contexts from each end (at most the number of contexts).

    Returns
    -------
    pandas.DataFrame
        ``2 * k`` rows: ``end`` (``highest`` then ``lowest``), ``rank`` (1 = most extreme),
        ``context`` (row of ``contexts``), ``text``, ``class``, [``label``, ``next_text``],
        ``document_id``, ``activation``. ``highest`` is in decreasing, ``lowest`` in increasing
        order of activation; ties go to the earlier context.
    """
    if activations.ndim != 3:
        raise ValueError(
            f"activations must be [layers, contexts, neurons], got {activations.shape}"
        )
    if activations.shape[1] != len(contexts):
        raise ValueError(
            f"activations hold {activations.shape[1]} contexts but the table has {len(contexts)}"
        )
    values = np.asarray(activations[layer_index, :, neuron], dtype=np.float64)
    k = max(0, min(int(k), values.shape[0]))
    highest = np.argsort(-values, kind="stable")[:k]
    lowest = np.argsort(values, kind="stable")[:k]
    wanted = [c for c in ("text", "class", "label", "next_text", "document_id") if c in contexts]
    parts = []
    for end, rows in (("highest", highest), ("lowest", lowest)):
        part = contexts.iloc[rows][wanted].reset_index(drop=True)
        part.insert(0, "end", end)
        part.insert(1, "rank", np.arange(1, len(rows) + 1))
        part.insert(2, "context", rows.astype(np.int64))
        part["activation"] = values[rows]
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


#: The file of a run directory that holds the interventions (one row per intervention).
INTERVENTIONS = rundir.INTERVENTIONS

#: The columns :func:`intervention_effects` reads.
INTERVENTION_COLUMNS = (
    "layer",
    "k",
    "k_label",
    "selection",
    "draw",
    "auc_before",
    "auc_after",
    "delta_logodds_positive",
    "delta_logodds_negative",
)

#: The verdicts of :func:`intervention_effects`.
MORE_THAN_RANDOM = "more than random"
NO_MORE_THAN_RANDOM = "no more than random neurons"
NO_SIGNIFICANT_NEURON = "no significant neuron"
NO_RANDOM_DRAWS = "no random draws"


def intervention_effects(
    interventions: pd.DataFrame,
    *,
    layers: Iterable[int] | None = None,
    k_labels: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Per layer and ``k_label``: the effect of changing the strongest neurons, against the same
    change to random neurons of the same layer.

    The effect of one intervention is how much it narrows the gap between the model's own
    log-odds of the positive follower in the two classes: ``delta_logodds_negative -
    delta_logodds_positive`` (the mean log-odds of positive contexts minus that of negative
    contexts, before minus after; positive: the change made the model's answer less different
    between the classes). A continuous measure: on a few hundred held-out contexts the AUC moves
    in steps, and a small change leaves it where it was. For each ``(layer, k_label)``, the
    ``top`` row's effect is set against the effects of its ``random`` rows (the draws).

    Parameters
    ----------
    interventions:
        The run's ``interventions.parquet``: one row per intervention, with at least the columns
        ``layer`` (-1: the whole model), ``k``, ``k_label``, ``selection`` (``top`` or
        ``random``), ``draw``, ``auc_before``, ``auc_after``; ``contexts``,
        ``delta_logodds_positive`` and ``delta_logodds_negative`` are carried over where present.
    layers:
        The layers the interventions were asked of (the run's recorded layers), or None. A layer
        of them without any row, and the whole model (-1), then get a row too, with the verdict
        ``no significant neuron``: a layer without significant neurons has no intervention.
    k_labels:
        The ``k_label`` values to report, in order (``run.json``'s ``interventions.ablate_k``),
        or None: those of the table, in the order they first appear.

    Returns
    -------
    pandas.DataFrame
        One row per ``(k_label, layer)``, by ``k_label`` then by layer (the whole model last):

        - ``layer``, ``k_label``; ``k`` (the top row's, else the draws'; missing without rows);
        - ``contexts``, ``auc_before``, ``auc_after``, ``delta_logodds_positive``,
          ``delta_logodds_negative``: the top row's (NaN without one);
        - ``top_effect``: the top row's effect (NaN without one);
        - ``draws``: how many random draws; ``random_mean``, ``random_sd`` (sample standard
          deviation, ``ddof=1``), ``random_min``, ``random_max`` of their effects (NaN without
          draws; ``random_sd`` NaN with fewer than 2);
        - ``rank``: of the top effect among the top effect and the draws', 1 = the largest drop;
          a draw that equals it ranks above it (``1 +`` the number of draws with an effect at
          least as large), so rank 1 means larger than every draw; missing without a top row;
        - ``z``: ``(top_effect - random_mean) / random_sd``, NaN where ``random_sd`` is 0 or NaN;
        - ``verdict``: ``more than random`` (the top effect exceeds the largest draw's), ``no
          more than random neurons`` (it does not), ``no significant neuron`` (no top row), or
          ``no random draws`` (a top row without draws to compare it with).

    Raises
    ------
    ValueError
        If a column is missing, or a ``(layer, k_label)`` has more than one top row.
    """
    missing = [c for c in INTERVENTION_COLUMNS if c not in interventions.columns]
    if missing:
        raise ValueError(f"the interventions table has no column {missing[0]!r}")
    table = interventions.assign(
        layer=interventions["layer"].astype(int),
        k_label=interventions["k_label"].astype(str),
        effect=interventions["delta_logodds_negative"].astype(float)
        - interventions["delta_logodds_positive"].astype(float),
    )
    labels = list(dict.fromkeys(table["k_label"] if k_labels is None else map(str, k_labels)))
    asked = set() if layers is None else {int(layer) for layer in layers} | {-1}
    rows = []
    for label in labels:
        part = table[table["k_label"] == label]
        for layer in sorted(set(part["layer"]) | asked, key=lambda x: (x == -1, x)):
            rows.append(_effect_row(part[part["layer"] == layer], layer, label))
    columns = [
        "layer", "k_label", "k", "contexts", "auc_before", "auc_after", "delta_logodds_positive",
        "delta_logodds_negative", "top_effect", "draws", "random_mean", "random_sd", "random_min",
        "random_max", "rank", "z", "verdict",
    ]  # fmt: skip
    effects = pd.DataFrame(rows, columns=columns)
    for column in ("k", "contexts", "rank"):
        effects[column] = effects[column].astype("Int64")
    return effects.astype({"layer": int, "draws": int})


def _effect_row(rows: pd.DataFrame, layer: int, label: str) -> dict[str, Any]:
    """One row of :func:`intervention_effects` from the interventions of one layer and k."""
    top = rows[rows["selection"] == "top"]
    if len(top) > 1:
        raise ValueError(f"layer {layer}, k_label {label!r} has {len(top)} top rows, not one")
    drawn = rows[rows["selection"] == "random"]
    effects = drawn["effect"].to_numpy(dtype=np.float64)
    effects = effects[~np.isnan(effects)]
    row: dict[str, Any] = {"layer": layer, "k_label": label, "draws": len(effects)}
    for column in ("k", "contexts"):
        source = top if len(top) else drawn
        row[column] = int(source[column].iloc[0]) if column in source and len(source) else None
    for column in ("auc_before", "auc_after", "delta_logodds_positive", "delta_logodds_negative"):
        row[column] = float(top[column].iloc[0]) if column in top and len(top) else math.nan
    top_effect = float(top["effect"].iloc[0]) if len(top) else math.nan
    mean = float(effects.mean()) if len(effects) else math.nan
    sd = float(effects.std(ddof=1)) if len(effects) >= 2 else math.nan
    row.update(
        top_effect=top_effect,
        random_mean=mean,
        random_sd=sd,
        random_min=float(effects.min()) if len(effects) else math.nan,
        random_max=float(effects.max()) if len(effects) else math.nan,
        rank=None if math.isnan(top_effect) else 1 + int((effects >= top_effect).sum()),
        z=(top_effect - mean) / sd if sd > 0 else math.nan,  # NaN > 0 is False
    )
    if not len(top):
        row["verdict"] = NO_SIGNIFICANT_NEURON
    elif not len(effects):
        row["verdict"] = NO_RANDOM_DRAWS
    elif top_effect > row["random_max"]:
        row["verdict"] = MORE_THAN_RANDOM
    else:
        row["verdict"] = NO_MORE_THAN_RANDOM
    return row


#: The file of a run directory that holds the decoding probes (one row per layer and k).
DECODING = rundir.DECODING

#: The columns of ``decoding.csv`` that the report reads.
DECODING_COLUMNS = ("layer", "k", "neurons_used", "cv_auc", "cv_auc_sd", "shuffled_auc")

#: "Most of it": the share of the best layer's distance from chance (AUC - 0.5) that the
#: fewest neurons must reach (:func:`decoding_summary`).
ENOUGH_SHARE = 0.9

#: A shuffled-label AUC above this (or above 3 chance standard deviations, if that is higher)
#: means the probes find something where there is nothing to find.
LEAK_AUC = 0.6


@dataclass(frozen=True)
class DecodingSummary:
    """What :func:`decoding_summary` decides from a decoding table.

    Attributes
    ----------
    best_layer, best_k, best_neurons, best_auc:
        The probe with the highest cross-validated AUC of the table (ties: the lower layer,
        then the fewer neurons): its layer, ``k`` label (``"5"``, ``"all"``), neurons and AUC.
    whole_auc, whole_neurons:
        The best layer's whole-layer probe (``k`` ``"all"``); NaN and None where the table has
        none.
    enough_k, enough_neurons, enough_auc, enough_selected, enough_threshold:
        The fewest neurons of the best layer that reach most of its AUC: the smallest ``k``
        whose AUC satisfies ``AUC - 0.5 >= ENOUGH_SHARE * (best_auc - 0.5)``, its neurons, AUC,
        the neurons chosen in every fold (``selected``, "" where not listed) and the AUC the
        rule asks for, ``0.5 + ENOUGH_SHARE * (best_auc - 0.5)``. None (NaN) where no probe is
        above chance (``best_auc <= 0.5``).
    single_layer, single_auc:
        The best one-neuron probe (``k`` ``"1"``) over the layers; None and NaN without one.
    shuffled_min, shuffled_max:
        The range of the shuffled-label AUCs over the table (NaN without the control).
    chance_sd:
        The standard deviation of an AUC by chance alone for the run's class sizes,
        ``sqrt((n1 + n2 + 1) / (12 n1 n2))`` (NaN where they are not known).
    leak_threshold:
        ``max(LEAK_AUC, 0.5 + 3 * chance_sd)``: a shuffled-label AUC above it is a leak.
    leaks:
        ``(layer, k label, shuffled AUC)`` of every probe whose shuffled-label AUC is above the
        threshold, highest first.
    """

    best_layer: int
    best_k: str
    best_neurons: int
    best_auc: float
    whole_auc: float
    whole_neurons: int | None
    enough_k: str | None
    enough_neurons: int | None
    enough_auc: float
    enough_selected: str
    enough_threshold: float
    single_layer: int | None
    single_auc: float
    shuffled_min: float
    shuffled_max: float
    chance_sd: float
    leak_threshold: float
    leaks: tuple[tuple[int, str, float], ...]


def decoding_summary(
    decoding: pd.DataFrame, *, class_sizes: tuple[int, int] | None = None
) -> DecodingSummary:
    """The report's reading of a decoding table: which layer knows most, how few of its neurons
    carry most of it, the best single neuron, and whether the shuffled-label control stays at
    chance.

    Parameters
    ----------
    decoding:
        The run's ``decoding.csv`` (:func:`neuronprobe.decoding.decode_layers`): one row per
        layer and ``k``, with the columns of :data:`DECODING_COLUMNS` (``selected`` is read
        where present).
    class_sizes:
        The number of contexts of each class, for the AUC's spread by chance alone; None: the
        leak threshold is :data:`LEAK_AUC`.

    Returns
    -------
    DecodingSummary

    Raises
    ------
    ValueError
        If a column is missing or no row has an AUC.
    """
    missing = [c for c in DECODING_COLUMNS if c not in decoding.columns]
    if missing:
        raise ValueError(f"the decoding table has no column {missing[0]!r}")
    table = decoding.assign(
        layer=decoding["layer"].astype(int),
        k=decoding["k"].astype(str),
        neurons_used=decoding["neurons_used"].astype(int),
        cv_auc=decoding["cv_auc"].astype(float),
        shuffled_auc=decoding["shuffled_auc"].astype(float),
    )
    table = table[table["cv_auc"].notna()]
    if table.empty:
        raise ValueError("the decoding table has no cross-validated AUC")
    order = table.assign(minus=-table["cv_auc"]).sort_values(
        ["minus", "layer", "neurons_used"], kind="stable"
    )
    best = order.iloc[0]
    best_auc = float(best["cv_auc"])
    layer = table[table["layer"] == int(best["layer"])].sort_values("neurons_used", kind="stable")
    whole = layer[layer["k"] == "all"]
    enough, threshold = None, math.nan
    if best_auc > 0.5:
        threshold = 0.5 + ENOUGH_SHARE * (best_auc - 0.5)
        # The rule as stated (AUC - 0.5 >= share * (best - 0.5)); the best probe itself passes.
        passing = layer[layer["cv_auc"] - 0.5 >= ENOUGH_SHARE * (best_auc - 0.5)]
        enough = passing.iloc[0]
    single = table[table["k"] == "1"]
    single_best = (
        single.assign(minus=-single["cv_auc"]).sort_values(["minus", "layer"]).iloc[0]
        if len(single)
        else None
    )
    chance_sd = math.nan
    if class_sizes is not None and min(class_sizes) > 0:
        n1, n2 = class_sizes
        chance_sd = math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))
    leak_threshold = LEAK_AUC if math.isnan(chance_sd) else max(LEAK_AUC, 0.5 + 3 * chance_sd)
    shuffled = table[table["shuffled_auc"].notna()]
    leaking = shuffled[shuffled["shuffled_auc"] > leak_threshold].sort_values(
        "shuffled_auc", ascending=False, kind="stable"
    )
    selected = ""
    if enough is not None and "selected" in table.columns and not _is_missing(enough["selected"]):
        selected = str(enough["selected"]).strip()
    return DecodingSummary(
        best_layer=int(best["layer"]),
        best_k=str(best["k"]),
        best_neurons=int(best["neurons_used"]),
        best_auc=best_auc,
        whole_auc=float(whole["cv_auc"].iloc[0]) if len(whole) else math.nan,
        whole_neurons=int(whole["neurons_used"].iloc[0]) if len(whole) else None,
        enough_k=None if enough is None else str(enough["k"]),
        enough_neurons=None if enough is None else int(enough["neurons_used"]),
        enough_auc=math.nan if enough is None else float(enough["cv_auc"]),
        enough_selected=selected,
        enough_threshold=threshold,
        single_layer=None if single_best is None else int(single_best["layer"]),
        single_auc=math.nan if single_best is None else float(single_best["cv_auc"]),
        shuffled_min=float(shuffled["shuffled_auc"].min()) if len(shuffled) else math.nan,
        shuffled_max=float(shuffled["shuffled_auc"].max()) if len(shuffled) else math.nan,
        chance_sd=chance_sd,
        leak_threshold=leak_threshold,
        leaks=tuple((int(r.layer), str(r.k), float(r.shuffled_auc)) for r in leaking.itertuples()),
    )


# ----------------------------------------------------------------------------------------------
# Reading the run directory
# ----------------------------------------------------------------------------------------------


@dataclass
class RunFiles:
    """Everything the report shows, as read from one run directory (by :func:`_read_run`).

    ``activations`` is ``[layers, contexts, neurons]`` (a memory map); it and ``contexts`` are
    None where the run directory no longer holds them. ``figures`` are ``(name, png bytes)``,
    the laminar profile first. ``decoding`` is ``decoding.csv`` (None for a run without it).
    """

    directory: Path
    record: dict[str, Any]
    neurons: pd.DataFrame
    layers: pd.DataFrame
    contexts: pd.DataFrame | None
    activations: Any | None
    figures: list[tuple[str, bytes]]
    decoding: pd.DataFrame | None = None


def _read_run(directory: Path) -> RunFiles:
    if not (directory / rundir.RUN_JSON).is_file():
        raise NeuronprobeError(
            f"{directory} has no {rundir.RUN_JSON}: it is not a run directory; give the --out "
            "folder of a neuronprobe run."
        )
    try:
        record = rundir.read_json(directory / rundir.RUN_JSON)
    except ValueError as error:
        raise NeuronprobeError(f"{directory / rundir.RUN_JSON} is not readable: {error}") from error
    for name in (rundir.NEURONS, rundir.LAYERS):
        if not (directory / name).is_file():
            raise NeuronprobeError(
                f"{directory} has no {name} (run status: {record.get('status', 'unknown')}); "
                f"finish the run with `neuronprobe run --out {directory}` first."
            )
    # What the page shows must be whole: a damaged file is named, never half-shown. The
    # contexts and activations are optional (deleted to save space, the page shows less), and
    # so is decoding.csv where run.json records no decoding (a run without the stage); where it
    # records one, a missing decoding.csv is named like any damaged file.
    decoded = isinstance(record.get("decoding"), dict) and "file" in record["decoding"]
    optional = [
        name
        for name in (rundir.CONTEXTS, rundir.ACTIVATIONS, DECODING)
        if (directory / name).exists() or (name == DECODING and decoded)
    ]
    figure_files = rundir.figure_files(directory, record)
    fix = f"`neuronprobe run --out {directory} --resume` recomputes it"
    rundir.check_files(
        directory, [rundir.NEURONS, rundir.LAYERS, *optional, *figure_files], record, fix
    )
    neurons = rundir.read_neurons(directory)
    layers = pd.read_csv(directory / rundir.LAYERS)
    contexts = None
    if rundir.CONTEXTS in optional:
        contexts = pd.read_parquet(directory / rundir.CONTEXTS)
    activations = None
    if rundir.ACTIVATIONS in optional:
        activations = np.load(directory / rundir.ACTIVATIONS, mmap_mode="r")
    figures = [
        (path.stem, path.read_bytes())
        for path in sorted((directory / rundir.FIGURES).glob("*.png"), key=_figure_order)
        if f"{rundir.FIGURES}/{path.name}" in figure_files
    ]
    decoding = None
    if DECODING in optional:
        decoding = _read_decoding(directory / DECODING, fix)
    return RunFiles(directory, record, neurons, layers, contexts, activations, figures, decoding)


def _read_decoding(path: Path, fix: str) -> pd.DataFrame:
    """``decoding.csv`` (already checked against ``run.json`` by :func:`rundir.check_files`),
    ``k`` and ``selected`` as text, or a one-line :class:`NeuronprobeError` that names it."""
    try:
        table = pd.read_csv(path, dtype={"k": str, "selected": str})
        missing = [c for c in DECODING_COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"it has no column {missing[0]!r}")
        if not pd.to_numeric(table["cv_auc"], errors="coerce").notna().any():
            raise ValueError("it has no cross-validated AUC")
    except (OSError, ValueError) as error:
        raise NeuronprobeError(
            f"{path} is not a readable decoding table ({' '.join(str(error).split())}); {fix}."
        ) from error
    return table


def _figure_order(path: Path) -> tuple[int, str]:
    """The laminar profile and its control first (the answer), then the per-layer figures."""
    for rank, prefix in enumerate(("layers", "control", "neurons_layer", "accuracy_layer")):
        if path.stem == prefix or (prefix.endswith("_layer") and path.stem.startswith(prefix)):
            return rank, path.stem
    return 4, path.stem


# ----------------------------------------------------------------------------------------------
# Writing it
# ----------------------------------------------------------------------------------------------


def write_report(directory: Path | str, *, top: int = 10, examples: int = 5) -> Path:
    """Write ``report.html`` into a finished run directory; return its path.

    Parameters
    ----------
    directory:
        The run directory (``neuronprobe run --out DIR``); only its files are read.
    top:
        How many of the strongest neurons to show (see :func:`top_neurons`).
    examples:
        How many contexts to show for each of them from each end: most and least active.

    Returns
    -------
    pathlib.Path
        ``directory / "report.html"``, written atomically (never half-written).

    Raises
    ------
    NeuronprobeError
        If the directory has no ``run.json``, ``neurons.parquet`` or ``layers.csv``.
    """
    directory = Path(directory)
    run = _read_run(directory)
    page = _render(run, top=top, examples=examples)
    path = directory / rundir.REPORT
    with rundir.atomic_path(path) as temporary:
        temporary.write_text(page, encoding="utf-8")
    logger.info("report written to %s (%d figures, %.1f MB)", path, _count_figures(page), _mb(page))
    return path


def _count_figures(page: str) -> int:
    return page.count("data:image/png;base64,")


def _mb(page: str) -> float:
    return len(page.encode("utf-8")) / 1e6


# ----------------------------------------------------------------------------------------------
# The page: a skeleton template and one partial per section, each fed by one function below
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """One section of the page.

    Attributes
    ----------
    anchor:
        The section's ``id`` (``<section id="answer">``, linked from the contents), and the name
        of its partial: ``templates/sections/<anchor>.html.j2``.
    title:
        Its heading, also its line in the contents.
    context:
        ``(run, facts, options) -> dict | None``: the values its partial shows, already decided
        (numbers formatted, sentences chosen); None leaves the section out of the page (a run
        directory without what it shows).
    """

    anchor: str
    title: str
    context: Callable[[RunFiles, Facts, PageOptions], dict[str, Any] | None]

    @property
    def template(self) -> str:
        return f"sections/{self.anchor}.html.j2"


@dataclass(frozen=True)
class PageOptions:
    """What the caller of :func:`write_report` chose.

    Attributes
    ----------
    top:
        How many of the strongest neurons to show.
    examples:
        How many contexts to show for each of them from each end (0: none).
    """

    top: int
    examples: int


def _render(run: RunFiles, *, top: int = 10, examples: int = 5) -> str:
    """The page's HTML for one run directory.

    The page skeleton (``templates/report.html.j2``) shows the sections of :data:`SECTIONS` in
    order, each from its own partial and its context function; adding a section is a partial
    and a function, listed in :data:`SECTIONS`.
    """
    facts = _facts(run)
    options = PageOptions(top=top, examples=examples)
    sections = []
    for section in SECTIONS:
        context = section.context(run, facts, options)
        if context is not None:
            sections.append({"anchor": section.anchor, "title": section.title,
                             "template": section.template, "data": context})  # fmt: skip
    record = run.record
    model = record.get("model", {}).get("name", record.get("config", {}).get("model", "a model"))
    dates = ", ".join(
        f"{label} {record[key]}"
        for key, label in (("started", "started"), ("probed", "refitted"), ("finished", "finished"))
        if key in record
    )
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            title=f"neuronprobe: which neurons of {model} tell “{facts.positive}” from "
            f"“{facts.negative}”?",
            directory=str(run.directory),
            dates=dates,
            status=str(record.get("status", "unknown")),
            facts=facts,
            sections=sections,
        )
    )


@functools.cache
def _environment() -> jinja2.Environment:
    """Templates from the package, every ``{{ value }}`` escaped by :func:`_escape`."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("neuronprobe", "templates"),
        autoescape=True,
        finalize=_escape,
        undefined=jinja2.StrictUndefined,  # a misspelt name fails, never shows as nothing
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters.update(
        count=_int, pvalue=_pvalue, percent=_percent, fixed=_fixed, number=_number, repr=repr
    )
    return environment


def _escape(value: Any) -> Markup:
    """Every value a template shows: HTML-escaped, with ``://`` defused so that no URL in the
    data becomes one here. Markup (a macro's output, a figure's data URI) passes as it is.

    Autoescaping would escape too, but with markupsafe's ``&#39;``; this keeps the page's
    ``html.escape`` spelling (``&#x27;``) and adds the ``://`` rule, in one place.
    """
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True).replace("://", ":&#47;&#47;"))


# ----------------------------------------------------------------------------------------------
# Formatting numbers for people (also the templates' filters)
# ----------------------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _int(value: Any) -> str:
    return "–" if _is_missing(value) else f"{int(value):,}"


def _pvalue(value: Any) -> str:
    if _is_missing(value):
        return "–"
    value = float(value)
    if value == 0.0:
        return "< 1e-300"
    if value < 1e-3:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.3f}"


def _percent(value: Any, digits: int = 1) -> str:
    return "–" if _is_missing(value) else f"{float(value):.{digits}f}%"


def _number(value: Any, digits: int = 3) -> str:
    if _is_missing(value):
        return "–"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    value = float(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.{digits - 1}e}"
    return (
        f"{value:.{digits}g}" if abs(value) < 1 else f"{value:,.{digits}f}".rstrip("0").rstrip(".")
    )


def _fixed(value: Any, digits: int = 3) -> str:
    return "–" if _is_missing(value) else f"{float(value):.{digits}f}"


@dataclass(frozen=True)
class _Value:
    """A run.json value for people; ``code`` when it is shown as code (lists and dicts)."""

    text: str
    code: bool = False


def _value(value: Any) -> _Value:
    if isinstance(value, dict | list | tuple):
        return _Value(json.dumps(value, ensure_ascii=False), code=True)
    if isinstance(value, bool):
        return _Value("yes" if value else "no")
    if isinstance(value, float):
        return _Value(_number(value, 4))
    if isinstance(value, int):
        return _Value(f"{value:,}")
    if value is None:
        return _Value("–")
    return _Value(str(value))


def _pairs(items: Iterable[tuple[Any, Any]]) -> list[tuple[str, _Value]]:
    """Rows of a key/value table: each value as :func:`_value` shows it."""
    return [
        (str(key), value if isinstance(value, _Value) else _value(value)) for key, value in items
    ]


def _data_uri(png: bytes) -> Markup:
    # The one value the page shows unescaped: base64 holds no character HTML would change.
    return Markup("data:image/png;base64," + base64.b64encode(png).decode("ascii"))


@dataclass(frozen=True)
class _Context:
    """A context split for showing: ``before`` + ``marked`` (the target, highlighted) +
    ``after``, then the next token (None where the table has none)."""

    before: str
    marked: str
    after: str
    next_text: str | None


def _split_context(text: str, target: str, next_text: str | None) -> _Context:
    """Where the target token (the context's last) is in its text."""
    before, marked, after = text, "", ""
    if target and text.endswith(target):
        before, marked = text[: len(text) - len(target)], target
    else:
        stripped = target.strip()
        at = text.rfind(stripped) if stripped else -1
        if at >= 0:
            before, marked, after = text[:at], stripped, text[at + len(stripped) :]
    # Leading white space of the target (" can") stays outside the highlight.
    core = marked.lstrip()
    before += marked[: len(marked) - len(core)]
    return _Context(before, core, after, next_text)


# ----------------------------------------------------------------------------------------------
# What several sections use
# ----------------------------------------------------------------------------------------------


@dataclass
class Facts:
    """Numbers and names that several sections use, computed once."""

    positive: str
    negative: str
    target: str
    test: str
    correction: str
    significance: float
    total: int
    significant: int
    n_layers: int
    per_layer: int
    layer_numbers: list[int]
    shuffled: int | None
    train_contexts: int | None
    test_contexts: int | None
    separated: int
    not_converged: int
    constant: int
    site: str
    position: int


def _facts(run: RunFiles) -> Facts:
    record, neurons = run.record, run.neurons
    config = record.get("config", {})
    contrast = record.get("contrast", config.get("contrast", {}))
    statistics = record.get("statistics", {})
    activations = record.get("activations", {})
    shuffled = None
    if "significant_shuffled" in run.layers.columns:
        shuffled = int(run.layers["significant_shuffled"].sum())
    return Facts(
        positive=str(contrast.get("positive_name", "positive")),
        negative=str(contrast.get("negative_name", "negative")),
        target=str(contrast.get("target", "")),
        test=str(statistics.get("test", config.get("test", "wald"))),
        correction=str(statistics.get("correction", config.get("correction", "bonferroni-layer"))),
        significance=float(statistics.get("significance", config.get("significance", 0.05))),
        total=len(neurons),
        significant=int(neurons["significant"].sum()),
        n_layers=int(neurons["layer"].nunique()),
        per_layer=int(run.layers["neurons"].iloc[0]) if len(run.layers) else 0,
        layer_numbers=[
            int(x) for x in activations.get("layers", sorted(neurons["layer"].unique()))
        ],
        shuffled=shuffled,
        train_contexts=statistics.get("train_contexts"),
        test_contexts=statistics.get("test_contexts"),
        separated=int(neurons["separated"].sum()) if "separated" in neurons else 0,
        not_converged=int((~neurons["converged"].astype(bool)).sum())
        if "converged" in neurons
        else 0,
        constant=int(neurons["constant"].sum()) if "constant" in neurons else 0,
        site=str(activations.get("site", config.get("site", "mlp.pre"))),
        position=int(activations.get("position", config.get("position", -1))),
    )


def _generalisation(neurons: pd.DataFrame) -> pd.DataFrame:
    """Per layer: mean train and test accuracy of the significant neurons, and their gap."""
    significant = neurons[neurons["significant"].to_numpy(dtype=bool)]
    table = significant.groupby("layer")[["train_acc", "test_acc"]].mean()
    table["gap"] = table["train_acc"] - table["test_acc"]
    table["count"] = significant.groupby("layer").size()
    return table


def _poorly_generalising_layers(neurons: pd.DataFrame) -> list[dict[str, str]]:
    """Layers whose significant neurons barely beat chance held out, or overfit unusually.

    A layer is named when the mean held-out accuracy of its significant neurons is below 52%,
    or its train-test gap is more than twice the median gap over layers (and over 2 points).
    Each as ``{"layer", "train", "test"}`` (mean accuracies, formatted).
    """
    table = _generalisation(neurons)
    if table.empty:
        return []
    median_gap = float(table["gap"].median())
    flagged = table[
        (table["test_acc"] < 52.0) | ((table["gap"] > 2 * median_gap) & (table["gap"] > 2.0))
    ]
    return [
        {"layer": str(int(layer)), "train": f"{r.train_acc:.1f}", "test": f"{r.test_acc:.1f}"}
        for layer, r in flagged.iterrows()
    ]


def _position_words(position: int) -> str:
    if position == -1:
        return "(the target token, the context's last)"
    if position == 0:
        return "(the context's first token)"
    if position < 0:
        return f"({-position - 1} tokens before the target)"
    return f"(token {position} from the start of the context)"


# ----------------------------------------------------------------------------------------------
# The sections: one function each, returning its partial's context
# ----------------------------------------------------------------------------------------------


def _answer(run: RunFiles, facts: Facts, options: PageOptions) -> dict[str, Any]:
    """The opening: effect sizes first (the model's own AUC, the best layer's probes, the best
    single neuron), then the count of significant neurons, the control and the rest."""
    ranked = run.layers.sort_values(["percent_significant", "layer"], ascending=[False, True])
    best_layers = ", ".join(
        f"{int(row.layer)} ({row.percent_significant:.1f}%)" for row in ranked.head(3).itertuples()
    )
    share = facts.significant / facts.total if facts.total else 0.0
    # How the control compares: a clear gap (at most a fifth as many pass by chance), or not.
    control = None
    if facts.shuffled is not None and facts.significant:
        control = "clear" if facts.shuffled * 5 <= facts.significant else "unclear"
    best = None
    significant = run.neurons[run.neurons["significant"].to_numpy(dtype=bool)]
    if len(significant):
        row = significant.sort_values(
            ["test_acc", "auc", "layer", "neuron"], ascending=[False, False, True, True]
        ).iloc[0]
        mean_test = float(significant["test_acc"].mean())
        best = {
            "mean_test": f"{mean_test:.1f}",
            "weak": mean_test < 60,
            "layer": int(row.layer),
            "neuron": int(row.neuron),
            "test_acc": f"{row.test_acc:.1f}",
            "auc": f"{row.auc:.2f}",
        }
    decoding = None
    summary = _decoding_summary(run)
    if summary is not None:
        decoding = {
            "layer": summary.best_layer,
            "auc": f"{summary.best_auc:.2f}",
            "what": _probe_words(summary.best_k, summary.best_neurons, None),
            "whole": None
            if summary.best_k == "all" or _is_missing(summary.whole_auc)
            else f"{summary.whole_auc:.2f}",
            "whole_neurons": _int(summary.whole_neurons),
        }
    return {
        "share": f"{share:.1%}",
        "best_layers": best_layers,
        "control": control,
        "best": best,
        "weak_layers": _poorly_generalising_layers(run.neurons),
        "behavior": _behavior(run),
        "decoding": decoding,
        "single": _best_single(run),
        "interventions": (run.directory / INTERVENTIONS).is_file(),
    }


def _probe_words(k: str, neurons: int, layer: int | None) -> str:
    """A probe in words: "the 5 strongest neurons of layer 3", "all 256 neurons of layer 3";
    without a layer, "its 5 strongest neurons", "all its 256 neurons"."""
    if layer is None:
        if k == "all":
            return f"all its {neurons:,} neurons"
        return "its strongest neuron" if neurons == 1 else f"its {neurons:,} strongest neurons"
    if k == "all":
        return f"all {neurons:,} neurons of layer {layer}"
    if neurons == 1:
        return f"the strongest neuron of layer {layer}"
    return f"the {neurons:,} strongest neurons of layer {layer}"


def _behavior(run: RunFiles) -> dict[str, Any] | None:
    """The model's own held-out AUC at telling the classes apart (``run.json``'s ``behavior``);
    None for a run without it."""
    behavior = run.record.get("behavior")
    if not isinstance(behavior, dict) or _is_missing(behavior.get("auc")):
        return None
    accuracy, contexts = behavior.get("accuracy"), behavior.get("test_contexts")
    return {
        "auc": f"{float(behavior['auc']):.2f}",
        "value": float(behavior["auc"]),
        "accuracy": None if _is_missing(accuracy) else _fixed(accuracy, 1),
        "contexts": None if _is_missing(contexts) else _int(contexts),
    }


def _best_single(run: RunFiles) -> dict[str, Any] | None:
    """The single neuron with the highest held-out AUC (``neurons.parquet``'s ``auc``): of the
    significant neurons, or of all where none is; None without held-out AUCs."""
    significant = run.neurons[run.neurons["significant"].to_numpy(dtype=bool)]
    pool = significant if len(significant) else run.neurons
    if "auc" not in pool or not pool["auc"].notna().any():
        return None
    row = pool.loc[pool["auc"].astype(float).idxmax()]
    return {
        "auc": f"{float(row.auc):.2f}",
        "value": float(row.auc),
        "layer": int(row.layer),
        "neuron": int(row.neuron),
        "significant": bool(len(significant)),
        "pool": _int(int(pool["auc"].notna().sum())),
    }


def _decoding_summary(run: RunFiles) -> DecodingSummary | None:
    """:func:`decoding_summary` of the run's ``decoding.csv``, with its class sizes; None
    without it."""
    if run.decoding is None:
        return None
    return decoding_summary(run.decoding, class_sizes=_class_sizes(run))


def _class_sizes(run: RunFiles) -> tuple[int, int] | None:
    """The contexts of each class (``contexts.parquet``), or half of the activations' contexts
    each (the run keeps the classes balanced); None where neither is known."""
    if run.contexts is not None and "label" in run.contexts.columns:
        labels = run.contexts["label"].to_numpy(dtype=bool)
        return int(labels.sum()), int((~labels).sum())
    shape = run.record.get("activations", {}).get("shape")
    if shape:
        contexts = int(shape[1])
        return contexts // 2, contexts - contexts // 2
    return None


def _question(run: RunFiles, facts: Facts, options: PageOptions) -> dict[str, Any]:
    contrast = run.record.get("contrast", {})
    config = run.record.get("config", {})
    followers = []
    # The positive followers; the negative ones, or the exclusions of the default negative
    # rule (a contrast has one or the other, or neither).
    for key, label, ids in (
        ("positive_followers", f"followers that make a context “{facts.positive}”", "positive_ids"),
        ("negative_followers", f"followers that make a context “{facts.negative}”", "negative_ids"),
        ("excluded_followers", f"followers excluded from “{facts.negative}” (first tokens)",
         "excluded_ids"),
    ):  # fmt: skip
        words = contrast.get(key, [])
        if words or ids == "positive_ids":
            followers.append({"label": label, "words": words, "ids": str(contrast.get(ids, "–"))})
    return {
        "target": contrast.get("target", facts.target),
        "target_id": str(contrast.get("target_id", "–")),
        "followers": followers,
        "length": str(contrast.get("context_length")),
        "model": run.record.get("model", {}).get("name", config.get("model", "the model")),
        "description": contrast.get("description"),
    }


_COUNT_LABELS = {
    "documents_scanned": "documents scanned",
    "found_positive": "contexts found, {positive}",
    "found_negative": "contexts found, {negative}",
    "duplicates_dropped_positive": "duplicates dropped, {positive}",
    "duplicates_dropped_negative": "duplicates dropped, {negative}",
    "target_text_occurrences": "occurrences of the target's text (inside words too)",
    "target_tokens": "target tokens in the documents scanned",
    "targets_too_early": "target tokens skipped: fewer than context_length tokens before them",
    "kept_per_class": "contexts kept per class (balanced, seeded sample)",
    "contexts": "contexts analysed (both classes)",
    "positive_spellings": "{positive} contexts by spelling of the follower",
}


def _data(run: RunFiles, facts: Facts, options: PageOptions) -> dict[str, Any]:
    record = run.record
    activations = record.get("activations", {})
    names = {"positive": f"“{facts.positive}”", "negative": f"“{facts.negative}”"}
    counts = [
        (_COUNT_LABELS.get(key, key.replace("_", " ")).format(**names), value)
        for key, value in record.get("counts", {}).items()
    ]
    recorded = [
        ("site", _Value(facts.site, code=True)),
        ("position in the context", _Value(f"{facts.position} {_position_words(facts.position)}")),
        ("layers", activations.get("layers")),
        ("array [layers, contexts, neurons]", activations.get("shape")),
    ]
    if facts.train_contexts is not None:
        recorded.append(("training contexts (fit, p-values)", _Value(_int(facts.train_contexts))))
        recorded.append(
            ("held-out contexts (test accuracy, AUC)", _Value(_int(facts.test_contexts)))
        )
    statistics = record.get("statistics", {})
    if "split" in statistics:
        recorded.append(("split", _Value(str(statistics["split"]))))
    return {
        "model": _pairs(record.get("model", {}).items()),
        "corpus": _pairs(record.get("corpus", {}).items()),
        "counts": _pairs(counts),
        "recorded": _pairs(recorded),
    }


def _figures(run: RunFiles, facts: Facts, options: PageOptions) -> dict[str, Any]:
    figures = []
    for name, png in run.figures:
        # Which caption: the laminar profile, its control, a layer's neurons or accuracies.
        match = re.fullmatch(r"(neurons|accuracy)_layer(-?\d+)", name)
        kind = (
            name
            if name in ("layers", "control", "interventions", "decoding")
            else match.group(1)
            if match
            else "other"
        )
        figures.append(
            {
                "name": name,
                "kind": kind,
                "layer": match.group(2) if match else None,
                "uri": _data_uri(png),
            }
        )
    return {"figures": figures}


def _neurons(run: RunFiles, facts: Facts, options: PageOptions) -> dict[str, Any]:
    chosen = top_neurons(run.neurons, options.top, test=facts.test)
    any_significant = not chosen.empty
    if not any_significant:
        chosen = top_neurons(run.neurons, options.top, significant_only=False, test=facts.test)
    has_cv = "cv_acc" in chosen.columns and bool(chosen["cv_acc"].notna().any())
    rows = [
        {
            "rank": rank,
            "layer": int(row.layer),
            "neuron": int(row.neuron),
            "beta": float(row.beta),
            "pvalue": row.pvalue,
            "pvalue_lr": row.pvalue_lr,
            "pvalue_adj": row.pvalue_adj,
            "auc": row.auc,
            "train_acc": row.train_acc,
            "test_acc": row.test_acc,
            "cv_acc": row.cv_acc if has_cv else None,
            "separated": "yes" if bool(getattr(row, "separated", False)) else "no",
        }
        for rank, row in enumerate(chosen.itertuples(), start=1)
    ]
    examples, missing = [], None
    if run.contexts is None or run.activations is None or options.examples <= 0:
        missing = (
            "contexts.parquet or activations.npy is missing"
            if options.examples > 0
            else "none asked for"
        )
    else:
        examples = _neuron_examples(run, facts, rows, options.examples)
    return {
        "any_significant": any_significant,
        "has_cv": has_cv,
        "rows": rows,
        "k": options.examples,
        "examples": examples,
        "missing": missing,
    }


def _neuron_examples(
    run: RunFiles, facts: Facts, rows: list[dict[str, Any]], k: int
) -> list[dict[str, Any]]:
    """For each shown neuron (of a recorded layer), its ``k`` most and least active contexts."""
    assert run.contexts is not None and run.activations is not None
    layer_positions = {layer: i for i, layer in enumerate(facts.layer_numbers)}
    blocks = []
    for row in rows:
        if row["layer"] not in layer_positions:
            continue
        found = example_contexts(
            run.contexts, run.activations, layer_positions[row["layer"]], row["neuron"], k
        )
        ends = []
        for end, label in (("highest", "Most active"), ("lowest", "Least active")):
            part = found[found["end"] == end]
            ends.append(
                {
                    "label": label,
                    "positives": int((part["class"] == facts.positive).sum()),
                    "count": len(part),
                    "contexts": [
                        {
                            "activation": _fixed(r.activation),
                            "class": str(r["class"]),
                            "text": _split_context(str(r.text), facts.target, r.get("next_text")),
                            "document": r.document_id,
                        }
                        for _, r in part.iterrows()
                    ],
                }
            )
        blocks.append({**row, "ends": ends})
    return blocks


def _verb(count: int, verb: str) -> str:
    """``reaches`` for one neuron, ``reach`` for several."""
    return verb + ("es" if verb.endswith(("ch", "sh", "s")) else "s") if count == 1 else verb


def _decoding(run: RunFiles, facts: Facts, options: PageOptions) -> dict[str, Any] | None:
    """How much does each layer know? The cross-validated probes on each layer's ``k``
    strongest neurons (``decoding.csv``), answer first; None without it, one sentence where
    ``run.json`` says the stage was skipped."""
    settings = run.record.get("decoding")
    settings = settings if isinstance(settings, dict) else {}
    summary = _decoding_summary(run)
    if summary is None:
        if "skipped" in settings:
            return {"skipped": str(settings["skipped"]).rstrip(".")}
        return None
    assert run.decoding is not None
    table = run.decoding.assign(
        layer=run.decoding["layer"].astype(int), k=run.decoding["k"].astype(str)
    )
    labels = sorted(table["k"].unique(), key=decode_k_order)
    pair = f"“{facts.positive}” and “{facts.negative}”"
    best_what = _probe_words(summary.best_k, summary.best_neurons, summary.best_layer)
    above = summary.best_auc > 0.5
    if above:
        best = (
            f"Read together by a cross-validated probe, {best_what} "
            f"{_verb(summary.best_neurons, 'tell')} {pair} apart with an AUC of "
            f"{summary.best_auc:.3f}"
        )
        if summary.best_k != "all" and summary.whole_neurons is not None:
            best += f"; all {summary.whole_neurons:,} of its neurons, {summary.whole_auc:.3f}"
        best += "."
    else:
        best = (
            f"No layer tells {pair} apart above chance: the best cross-validated AUC is "
            f"{summary.best_auc:.3f} ({best_what})."
        )
    enough = None
    if summary.enough_k is not None and summary.enough_neurons is not None:
        tried = [label for label in labels if label != "all"]
        tried += ["the whole layer"] if "all" in labels else []
        what = _probe_words(summary.enough_k, summary.enough_neurons, summary.best_layer)
        sentence = (
            f"{what[0].upper()}{what[1:]} {_verb(summary.enough_neurons, 'reach')} AUC "
            f"{summary.enough_auc:.3f}, at least {ENOUGH_SHARE:.0%} of the way from chance (0.5) "
            f"to the layer's best, {summary.best_auc:.3f}: the smallest k tried "
            f"({_and(tried)}) with AUC − 0.5 ≥ {ENOUGH_SHARE:g} × ({summary.best_auc:.3f} − "
            f"0.5), that is AUC ≥ {summary.enough_threshold:.3f}."
        )
        if summary.enough_selected:
            chosen = summary.enough_selected.split()
            sentence += (
                f" The neuron{'s' * (len(chosen) != 1)} chosen in every fold: {_and(chosen)}."
            )
        enough = {
            "count": "The whole layer"
            if summary.enough_k == "all"
            else _neurons_words(summary.enough_neurons).capitalize(),
            "sentence": sentence,
        }
    single = None
    if summary.single_layer is not None:
        single = (
            f"The best one-neuron probe (k = 1, at layer {summary.single_layer}) reaches AUC "
            f"{summary.single_auc:.3f}, against {summary.best_auc:.3f} for the best probe; its "
            "neuron is chosen on each fold's training part, so the choice does not inflate it."
        )
    neuron = _best_single(run)
    if neuron is not None:
        pool = "significant neurons" if neuron["significant"] else "neurons"
        table_words = (
            f"The neuron table's best held-out AUC, {neuron['value']:.3f} (layer "
            f"{neuron['layer']}, neuron {neuron['neuron']}), is the largest of {neuron['pool']} "
            f"{pool}' AUCs on the same held-out contexts, so it flatters that neuron."
        )
        single = table_words if single is None else f"{single} {table_words}"
    model = None
    behavior = _behavior(run)
    if behavior is not None:
        auc = behavior["value"]
        shown = f"{summary.best_auc:.3f}", f"{auc:.3f}"
        compared = (
            "as well as"
            if shown[0] == shown[1]
            else "better than"
            if summary.best_auc > auc
            else "less well than"
        )
        held_out = behavior["contexts"]
        total = run.record.get("counts", {}).get("contexts")
        cv = settings.get("cv")
        model = (
            f"Read at its output, the model reaches a held-out AUC of {auc:.3f}: the best probe tells the classes apart {compared} the model's output does "
            f"({shown[0]} against {shown[1]}). The two are measured on different contexts: the "
            f"model on the {held_out + ' ' if held_out else ''}held-out contexts of the split, the "
            f"probes by {f'{cv}-fold ' if cv else ''}cross-validation over all "
            f"{_int(total) + ' ' if total is not None else ''}contexts."
        )
    control, leaks = None, None
    if not _is_missing(summary.shuffled_min):
        control = (
            f"with the labels shuffled, the same procedure gives AUCs from "
            f"{summary.shuffled_min:.3f} to {summary.shuffled_max:.3f} over all layers and k "
            "(chance: 0.5"
        )
        sizes = _class_sizes(run)
        if sizes is not None and not _is_missing(summary.chance_sd):
            control += (
                f"; with {sizes[0]:,} and {sizes[1]:,} contexts of the two classes, chance alone "
                f"moves an AUC by about {summary.chance_sd:.3f}, one standard deviation"
            )
        control += ")."
        if summary.leaks:
            shown_leaks = [
                f"layer {layer} with {'the whole layer' if k == 'all' else f'k = {k}'} "
                f"({value:.3f})"
                for layer, k, value in summary.leaks[:3]
            ]
            if len(summary.leaks) > 3:
                shown_leaks.append(f"{len(summary.leaks) - 3} more")
            leaks = (
                f"With shuffled labels, {_and(shown_leaks)} "
                f"{'reaches' if len(summary.leaks) == 1 else 'reach'} an AUC above "
                f"{summary.leak_threshold:.3f} ({LEAK_AUC:g}, or 0.5 plus 3 chance standard "
                "deviations where that is higher), where nothing should be found. Look for "
                "duplicate contexts, or contexts of one document on both sides of a fold"
                + ("" if settings.get("grouped") else " (the folds were not grouped by document)")
                + "."
            )
    best_cell = (summary.best_layer, summary.best_k)
    rows = []
    for layer, part in table.groupby("layer", sort=True):
        by_k = {str(r.k): r for r in part.itertuples()}
        cells = []
        for label in labels:
            found = by_k.get(label)
            text = "–"
            if found is not None and not _is_missing(found.cv_auc):
                text = f"{found.cv_auc:.3f}"
                if not _is_missing(found.cv_auc_sd):
                    text += f" ± {found.cv_auc_sd:.2f}"
            cells.append({"text": text, "best": (int(layer), label) == best_cell})
        shuffled = part["shuffled_auc"].astype(float).dropna()
        spread = "–"
        if len(shuffled):
            low, high = f"{shuffled.min():.3f}", f"{shuffled.max():.3f}"
            spread = low if low == high else f"{low}–{high}"
        rows.append({"layer": str(layer), "cells": cells, "shuffled": spread})
    test = str(settings.get("test", facts.test))
    return {
        "skipped": None,
        "best_layer": summary.best_layer,
        "above_chance": above,
        "best": best,
        "enough": enough,
        "single": single,
        "model": model,
        "control": control,
        "leaks": leaks,
        "folds": ("stratified, document-grouped " if settings.get("grouped") else "stratified ")
        + (f"{settings['cv']}-fold " if settings.get("cv") is not None else "")
        + "cross-validation",
        "seed": str(settings.get("seed", run.record.get("seed", "–"))),
        "C": f"{float(settings.get('C', 1.0)):g}",
        "statistic": "likelihood-ratio statistic" if test == "lr" else "Wald |z|",
        "headers": ["layer"]
        + ["whole layer" if label == "all" else f"k = {label}" for label in labels]
        + ["shuffled labels"],
        "rows": rows,
        "figure": any(name == "decoding" for name, _ in run.figures),
    }


# How each ablation sets a changed neuron: the phrase after "Setting the neurons ...", with
# {its} for "its"/"their", and one sentence that says what it means.
_ABLATIONS = {
    "mean": (
        "to {its} training mean",
        "each changed neuron is set to its mean over the training contexts, so that it no longer "
        "varies with the context but keeps its usual level",
    ),
    "zero": (
        "to zero",
        "each changed neuron is set to 0, whatever the context",
    ),
    "patch": (
        "to {its} values from contexts of the other class",
        "each changed neuron is given the value it takes on a context of the other class "
        "(activation patching), as if the model were reading the other kind of context",
    ),
}


def _and(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _layers_words(layers: list[int]) -> str:
    return ("layer " if len(layers) == 1 else "layers ") + _and([str(x) for x in layers])


def _neurons_words(k: int) -> str:
    return "1 neuron" if k == 1 else f"{k:,} neurons"


def _auc_pair(before: float, after: float) -> tuple[str, str]:
    """Both AUCs with 2 decimals, or as many more (up to 4) as it takes to tell them apart."""
    for digits in (2, 3, 4):
        shown = f"{before:.{digits}f}", f"{after:.{digits}f}"
        if shown[0] != shown[1]:
            break
    return shown


def _intervention_sentence(row: Any, label: str, ablation: str) -> str:
    """One intervention in plain words: what was changed, the AUC before and after, how it
    compares with the random draws."""
    k, layer = int(row.k), int(row.layer)
    if layer == -1:
        if label == "all":
            subject = f"every significant neuron of every layer at once ({_neurons_words(k)})"
        else:
            subject = f"the {label} strongest significant neurons of every layer at once "
            subject += f"({_neurons_words(k)})"
    elif label == "all":
        subject = (
            f"the one significant neuron of layer {layer}"
            if k == 1
            else f"all {k:,} significant neurons of layer {layer}"
        )
    elif label.isdigit() and k < int(label):
        subject = f"the {'only' if k == 1 else k} significant neuron{'s' * (k != 1)} of layer "
        subject += f"{layer} (it has fewer than {label})"
    else:
        subject = f"the strongest neuron of layer {layer}" if k == 1 else (
            f"the {k:,} strongest neurons of layer {layer}"
        )  # fmt: skip
    setting = _ABLATIONS.get(ablation, (f"by {ablation} ablation", ""))[0]
    setting = setting.format(its="its" if k == 1 else "their")
    before, after = _auc_pair(row.auc_before, row.auc_after)
    auc = f"held-out AUC {before} → {after}" if before != after else f"held-out AUC {before}"
    if row.top_effect > 0:
        change = "narrows the gap between the model's own log-odds in the two classes by "
        change += f"{row.top_effect:.3f} ({auc})"
    elif row.top_effect < 0:
        change = "widens the gap between the model's own log-odds in the two classes by "
        change += f"{-row.top_effect:.3f} ({auc})"
    else:
        change = (
            f"leaves the gap between the model's own log-odds in the two classes as it was ({auc})"
        )
    where = "the same layers" if layer == -1 else "the same layer"
    draws = f"{int(row.draws)} random draw{'s' * (int(row.draws) != 1)} of {_neurons_words(k)}"
    if row.verdict == MORE_THAN_RANDOM:
        compared = f"more than any of {draws} from {where}"
    elif row.verdict == NO_MORE_THAN_RANDOM:
        compared = (
            f"no more than random neurons: {int(row.rank) - 1} of {draws} from {where} "
            "narrow it as much or more"
        )
    else:
        compared = "with no random draws to compare it with"
    z = "" if _is_missing(row.z) else f" (z = {row.z:.1f})"
    return f"Setting {subject} {setting} {change}, {compared}{z}."


def _effect_cells(row: Any) -> dict[str, Any]:
    """One row of a section's table, formatted."""
    has_top = not _is_missing(row.top_effect)
    spread = "–"
    if row.draws:
        sd = "–" if _is_missing(row.random_sd) else f"{row.random_sd:.3f}"
        spread = f"{row.random_mean:+.3f} ± {sd}"
    return {
        "layer": "all layers" if row.layer == -1 else str(row.layer),
        "k": _int(None if pd.isna(row.k) else row.k),
        "auc": f"{row.auc_before:.3f} → {row.auc_after:.3f}" if has_top else "–",
        "top": f"{row.top_effect:+.3f}" if has_top else "–",
        "random": spread,
        "range": f"{row.random_min:+.3f} to {row.random_max:+.3f}" if row.draws else "–",
        "rank": f"{row.rank} of {row.draws + 1}" if has_top else "–",
        "z": "–" if _is_missing(row.z) else f"{row.z:.1f}",
        "positive": "–" if not has_top else _signed(row.delta_logodds_positive),
        "negative": "–" if not has_top else _signed(row.delta_logodds_negative),
        "verdict": row.verdict,
        "more": row.verdict == MORE_THAN_RANDOM,
    }


def _signed(value: Any) -> str:
    return "–" if _is_missing(value) else f"{float(value):+.2f}"


def _interventions(run: RunFiles, facts: Facts, options: PageOptions) -> dict[str, Any] | None:
    """Does the model use the neurons? Its own AUC when the strongest neurons are changed,
    against random neurons of the same layer (``interventions.parquet``; None without it)."""
    path = run.directory / INTERVENTIONS
    if not path.is_file():
        return None
    fix = f"`neuronprobe run --out {run.directory} --resume` recomputes it"
    try:
        table = pd.read_parquet(path)
        missing = [c for c in INTERVENTION_COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"it has no column {missing[0]!r}")
    except (OSError, ValueError) as error:
        raise NeuronprobeError(
            f"{path} is not a readable interventions table ({' '.join(str(error).split())}); {fix}."
        ) from error
    settings = run.record.get("interventions", {})
    ablations = list(dict.fromkeys(str(a) for a in table.get("ablation", [])))
    ablation = str(settings.get("ablation", ablations[0] if ablations else "mean"))
    if "ablation" in table.columns:
        table = table[table["ablation"].astype(str) == ablation]
    effects = intervention_effects(
        table, layers=facts.layer_numbers, k_labels=settings.get("ablate_k")
    )
    draws = int(settings.get("random_draws", effects["draws"].max() if len(effects) else 0))
    contexts = settings.get("contexts")
    if contexts is None and "contexts" in table.columns and len(table):
        contexts = int(table["contexts"].max())
    groups = []
    for label, part in effects.groupby("k_label", sort=False):
        label = str(label)
        layers_part = part[part["layer"] != -1]
        with_top = layers_part[layers_part["top_effect"].notna()]
        more = with_top[with_top["verdict"] == MORE_THAN_RANDOM]
        lead = None
        featured = more if len(more) else with_top
        if len(featured):
            # A row as a named tuple: a Series' .rank would be its method, not the column.
            best = next(featured.loc[[featured["top_effect"].idxmax()]].itertuples())
            lead = _intervention_sentence(best, label, ablation)
        not_more = with_top[with_top["verdict"] == NO_MORE_THAN_RANDOM]
        none = layers_part[layers_part["verdict"] == NO_SIGNIFICANT_NEURON]
        whole = part[(part["layer"] == -1) & part["top_effect"].notna()]
        groups.append(
            {
                "label": label,
                "what": "all significant neurons of each layer"
                if label == "all"
                else f"the {label} strongest significant neurons of each layer",
                "lead": lead,
                "more": _layers_words([int(x) for x in more["layer"]]) if len(more) else None,
                "not_more": _layers_words([int(x) for x in not_more["layer"]])
                if len(not_more)
                else None,
                "none": _layers_words([int(x) for x in none["layer"]]) if len(none) else None,
                # Layers that beat every draw by chance alone: 1 in (draws + 1) of those tested.
                "tested": len(with_top),
                "by_chance": f"{len(with_top) / (draws + 1):.1f}" if draws else None,
                "whole": _intervention_sentence(next(whole.itertuples()), label, ablation)
                if len(whole)
                else None,
                "rows": [_effect_cells(row) for row in part.itertuples(index=False)],
            }
        )
    return {
        "ablation": ablation,
        "ablation_meaning": _ABLATIONS.get(ablation, ("", ""))[1],
        "site": str(settings.get("site", facts.site)),
        "draws": draws,
        "contexts": _int(contexts) if contexts is not None else None,
        "seed": None if settings.get("seed") is None else str(settings["seed"]),
        "groups": groups,
        "figure": any(name == "interventions" for name, _ in run.figures),
    }


# Column of layers.csv -> (heading, format); other columns show their name and _number.
_LAYER_COLUMNS = {
    "layer": ("layer", lambda v: str(int(v))),
    "neurons": ("neurons", _int),
    "significant": ("significant", _int),
    "percent_significant": ("% significant", _percent),
    "significant_positive": ("sig. beta>0", _int),
    "significant_negative": ("sig. beta<0", _int),
    "train_acc_positive": ("train acc. beta>0", _percent),
    "train_acc_negative": ("train acc. beta<0", _percent),
    "test_acc_positive": ("test acc. beta>0", _percent),
    "test_acc_negative": ("test acc. beta<0", _percent),
    "auc_significant": ("AUC (sig.)", _fixed),
    "significant_shuffled": ("sig. shuffled", _int),
    "percent_significant_shuffled": ("% sig. shuffled", lambda v: _percent(v, 2)),
}


def _layers(run: RunFiles, facts: Facts, options: PageOptions) -> dict[str, Any]:
    columns = list(run.layers.columns)
    formats = [_LAYER_COLUMNS.get(c, ("", _number))[1] for c in columns]
    return {
        "headers": [_LAYER_COLUMNS.get(c, (c, None))[0] for c in columns],
        "rows": [
            [format_(value) for format_, value in zip(formats, record, strict=True)]
            for record in run.layers.itertuples(index=False)
        ],
    }


_SITE_WORDS = {
    "mlp.pre": " (the MLP expansion before its non-linearity, as the notebook)",
    "mlp.post": " (the MLP expansion after its non-linearity: the down projection's input)",
    "resid.post": " (the block's output hidden state, not MLP neurons)",
}


def _caveats(run: RunFiles, facts: Facts, options: PageOptions) -> dict[str, Any]:
    statistics = run.record.get("statistics", {})
    config = run.record.get("config", {})
    threshold = statistics.get("pvalue_threshold", run.neurons["pvalue_threshold"].iloc[0])
    split = None
    if facts.test_contexts:
        split = {
            "train": _int(facts.train_contexts),
            "test": _int(facts.test_contexts),
            # The standard error of one accuracy near 50%, in points.
            "se": f"{100 * math.sqrt(0.25 / facts.test_contexts):.1f}",
        }
    # Documents with several contexts, when the split may put them on both sides.
    shared_documents = 0
    if not config.get("split_by_document", False) and run.contexts is not None:
        shared_documents = int((run.contexts["document_id"].value_counts() > 1).sum())
    generalisation = _generalisation(run.neurons)
    spread = None
    if not generalisation.empty:
        worst = generalisation["test_acc"].idxmin()
        best = generalisation["test_acc"].idxmax()
        spread = {
            end: {
                "layer": str(int(layer)),
                "train": f"{generalisation.loc[layer, 'train_acc']:.1f}",
                "test": f"{generalisation.loc[layer, 'test_acc']:.1f}",
            }
            for end, layer in (("worst", worst), ("best", best))
        }
    return {
        "threshold": _pvalue(threshold),
        "alpha": f"{facts.significance:g}",
        "expected_false": f"{facts.n_layers * facts.significance:g}",
        "fdr": f"{facts.significance:.0%}",
        "split": split,
        "shared_documents": _int(shared_documents) if shared_documents else None,
        "spread": spread,
        "weak_layers": _poorly_generalising_layers(run.neurons),
        "site_words": _SITE_WORDS.get(facts.site, ""),
        "position_words": _position_words(facts.position),
        "drop_duplicates": bool(config.get("drop_duplicates", True)),
    }


def _rerun(run: RunFiles, facts: Facts, options: PageOptions) -> dict[str, Any]:
    record = run.record
    config = record.get("config", {})
    # The report's own time is not shown: it is known only after the page is written, and
    # leaving it out keeps `neuronprobe report` byte-identical for the same run directory.
    timings = {k: v for k, v in record.get("timings_s", {}).items() if k != "report"}
    return {
        "seed": str(record.get("seed", config.get("seed", "–"))),
        "config": _pairs(
            (k, _Value("all") if k == "layers" and v is None else v) for k, v in config.items()
        ),
        "statistics": _pairs(record.get("statistics", {}).items()),
        "versions": _pairs(record.get("versions", {}).items()),
        "timings": _pairs(timings.items()),
    }


#: The page's sections, in order; each shows ``templates/sections/<anchor>.html.j2``.
SECTIONS: tuple[Section, ...] = (
    Section("answer", "The answer, first", _answer),
    Section("question", "The question", _question),
    Section("data", "Model, corpus and contexts", _data),
    Section("figures", "Figures", _figures),
    Section("neurons", "The strongest neurons and their contexts", _neurons),
    Section("decoding", "How much does each layer know?", _decoding),
    Section("interventions", "Does the model use these neurons?", _interventions),
    Section("layers", "Layer by layer", _layers),
    Section("caveats", "How far to trust it", _caveats),
    Section("rerun", "Settings, versions, and how to rerun", _rerun),
)
