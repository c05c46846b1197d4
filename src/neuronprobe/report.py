"""Stage 6, the report: one self-contained HTML page that a scientist can read without the code.

Entry point: :func:`write_report` (a finished run directory -> ``report.html`` in it). The page
reads only the files of the run directory (``run.json``, ``neurons.parquet``, ``layers.csv``,
``contexts.parquet``, ``activations.npy``, ``figures/*.png``) and says, answer first, which
layers carry the distinction, which neurons are strongest, the contexts that drive them, and why
(or how far) to believe it: the shuffled-label control, the correction, the caveats.

The file stands alone: figures are embedded as base64 PNG data URIs, the CSS is inline, there is
no script and no link outside the page, and a Content-Security-Policy forbids the browser to
fetch anything. Every text that comes from the run (corpus text, names, paths) is HTML-escaped
and its ``://`` written as ``:&#47;&#47;``, so corpus text that holds a URL shows as text and
never becomes a link. The same run directory gives the same bytes.

Two helpers are public because they are the report's decisions: :func:`top_neurons` (which
neurons count as the strongest) and :func:`example_contexts` (the contexts that drive a neuron
most and least).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neuronprobe import rundir
from neuronprobe.errors import NeuronprobeError

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# The report's two decisions
# ----------------------------------------------------------------------------------------------


def top_neurons(
    neurons: pd.DataFrame,
    n: int,
    *,
    significant_only: bool = True,
    test: str | None = None,
) -> pd.DataFrame:
    """The ``n`` strongest neurons of a neuron table.

    Strongest means: the smallest deciding p-value after the correction (``pvalue_adj``);
    ties (frequent: Benjamini-Hochberg's adjusted p-values are step-wise, and capped at 1) are
    broken by the smaller raw deciding p-value when ``test`` names it (``wald``: ``pvalue``,
    ``lr``: ``pvalue_lr``), then by the larger ``abs(beta)``, then by layer and neuron, so the
    order is total and reproducible. NaN p-values sort last.

    Parameters
    ----------
    neurons:
        A table from :func:`neuronprobe.tables.neuron_table` (``neurons.parquet``).
    n:
        How many neurons to return (fewer if fewer qualify).
    significant_only:
        Keep only the neurons marked ``significant`` (default). With False, the strongest
        neurons whether or not they pass: the closest candidates of a run where none does.
    test:
        The run's deciding test (``run.json``'s ``statistics.test``), or None to break ties by
        ``abs(beta)`` directly.

    Returns
    -------
    pandas.DataFrame
        The chosen rows, strongest first, with the table's columns and index.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rows = neurons[neurons["significant"].to_numpy(dtype=bool)] if significant_only else neurons
    keys = pd.DataFrame(index=rows.index)
    keys["adjusted"] = rows["pvalue_adj"].astype(float).fillna(np.inf)
    if test is not None:
        column = {"wald": "pvalue", "lr": "pvalue_lr"}.get(test)
        if column is None:
            raise ValueError(f"test must be 'wald', 'lr' or None, got {test!r}")
        keys["raw"] = rows[column].astype(float).fillna(np.inf)
    keys["strength"] = -rows["beta"].astype(float).abs().fillna(0.0)
    keys["layer"] = rows["layer"]
    keys["neuron"] = rows["neuron"]
    order = keys.sort_values(list(keys.columns), kind="stable").index
    return rows.loc[order[:n]]


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


# ----------------------------------------------------------------------------------------------
# Reading the run directory
# ----------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything the report shows, as read from one run directory."""

    directory: Path
    record: dict[str, Any]
    neurons: pd.DataFrame
    layers: pd.DataFrame
    contexts: pd.DataFrame | None
    activations: Any | None
    figures: list[tuple[str, bytes]]


def _read_run(directory: Path) -> _Run:
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
    # contexts and activations are optional (deleted to save space, the page shows less).
    optional = [
        name for name in (rundir.CONTEXTS, rundir.ACTIVATIONS) if (directory / name).exists()
    ]
    figure_files = rundir.figure_files(directory, record)
    rundir.check_files(
        directory,
        [rundir.NEURONS, rundir.LAYERS, *optional, *figure_files],
        record,
        f"`neuronprobe run --out {directory} --resume` recomputes it",
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
    return _Run(directory, record, neurons, layers, contexts, activations, figures)


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
# Formatting: every run-derived text goes through _text
# ----------------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    """HTML-escaped text with ``://`` defused, so that no URL in the data becomes one here."""
    return html.escape(str(value), quote=True).replace("://", ":&#47;&#47;")


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _int(value: Any) -> str:
    return "–" if _is_missing(value) else f"{int(value):,}"


def _pvalue(value: Any) -> str:
    if _is_missing(value):
        return "–"
    value = float(value)
    if value == 0.0:
        return "&lt; 1e-300"
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


def _value(value: Any) -> str:
    """A run.json value for people: lists and dicts as compact JSON, all escaped."""
    if isinstance(value, dict | list | tuple):
        return f"<code>{_text(json.dumps(value, ensure_ascii=False))}</code>"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _number(value, 4)
    if isinstance(value, int):
        return _text(f"{value:,}")
    if value is None:
        return "–"
    return _text(value)


def _table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    numeric: Sequence[bool] | None = None,
    css: str = "",
) -> str:
    """An HTML table; cells are given as HTML already (formatted and escaped by the caller)."""
    numeric = list(numeric) if numeric is not None else [False] * len(headers)
    head = "".join(
        f"<th{' class=num' if is_num else ''}>{header}</th>"
        for header, is_num in zip(headers, numeric, strict=True)
    )
    body = "\n".join(
        "<tr>"
        + "".join(
            f"<td{' class=num' if is_num else ''}>{cell}</td>"
            for cell, is_num in zip(row, numeric, strict=True)
        )
        + "</tr>"
        for row in rows
    )
    return (
        f'<div class="scroll"><table class="{css}"><thead><tr>{head}</tr></thead>\n<tbody>\n'
        f"{body}\n</tbody></table></div>"
    )


def _pairs(items: Iterable[tuple[str, str]]) -> str:
    """A two-column key/value table; values are HTML already."""
    rows = "\n".join(f"<tr><th>{key}</th><td>{value}</td></tr>" for key, value in items)
    return f'<table class="pairs"><tbody>\n{rows}\n</tbody></table>'


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(png: bytes, alt: str, caption: str, anchor: str) -> str:
    return (
        f'<figure id="{anchor}"><img src="{_data_uri(png)}" alt="{_text(alt)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _context_html(text: str, target: str, next_text: str | None) -> str:
    """The context with its target token (its last token) in ``<mark>``, then the next token."""
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
    out = _text(before)
    if core:
        out += f"<mark>{_text(core)}</mark>"
    out += _text(after)
    if next_text is not None:
        out += f'<span class="next" title="next token (not seen by the model)">{_text(next_text)}</span>'
    return f'<span class="ctx">{out}</span>'


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------

_CSS = """
:root { --ink: #1d1d1f; --muted: #5f6368; --rule: #d9d9de; --band: #f6f6f8; --accent: #6b2c91; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       max-width: 1180px; margin: 0 auto; padding: 1.5rem 2rem 4rem; }
h1 { font-size: 1.7rem; margin: 0 0 .3rem; }
h2 { font-size: 1.3rem; margin-top: 2.4rem; padding-bottom: .2rem; border-bottom: 2px solid var(--rule); }
h3 { font-size: 1.05rem; margin: 1.6rem 0 .4rem; }
p, li { max-width: 80ch; }
.lead { color: var(--muted); margin-top: 0; }
.answer { background: #f3ecf7; border-left: 5px solid var(--accent); padding: .6rem 1.2rem; }
.answer li { margin: .3rem 0; }
.warning { background: #fff4e5; border-left: 5px solid #e08600; padding: .5rem 1rem; }
nav.toc { background: var(--band); padding: .5rem 1.2rem; border-radius: 6px; display: inline-block; }
nav.toc ol { margin: .3rem 0; padding-left: 1.3rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .88rem; }
th, td { padding: .25rem .6rem; border-bottom: 1px solid var(--rule); text-align: left;
         vertical-align: top; }
thead th { background: var(--band); position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fbfbfc; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
.scroll { overflow-x: auto; max-width: 100%; }
table.pairs th { font-weight: 600; white-space: nowrap; color: var(--muted); }
table.wide { width: 100%; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: .85em; }
pre { background: var(--band); padding: .7rem 1rem; border-radius: 6px; overflow-x: auto;
      white-space: pre-wrap; }
.ctx { white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .85em; }
mark { background: #ffe066; padding: 0 .1em; border-radius: 2px; }
.next { color: #9a9aa0; font-style: italic; }
.next::before { content: " \\2192"; font-style: normal; }
.positive { color: #b3261e; font-weight: 600; }
.negative { color: #1e7b34; font-weight: 600; }
figure { margin: 1.2rem 0 2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--rule); }
figcaption { color: var(--muted); font-size: .9rem; max-width: 95ch; margin-top: .3rem; }
.neuron { border-top: 1px dashed var(--rule); margin-top: 1.2rem; }
.examples { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
@media (max-width: 900px) { .examples { grid-template-columns: 1fr; } }
@media print { nav.toc { display: none; } thead th { position: static; } }
"""

_SECTIONS = (
    ("answer", "The answer, first"),
    ("question", "The question"),
    ("data", "Model, corpus and contexts"),
    ("figures", "Figures"),
    ("neurons", "The strongest neurons and their contexts"),
    ("layers", "Layer by layer"),
    ("caveats", "How far to trust it"),
    ("rerun", "Settings, versions, and how to rerun"),
)


@dataclass
class _Facts:
    """Numbers that several sections use, computed once."""

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


def _facts(run: _Run) -> _Facts:
    record, neurons = run.record, run.neurons
    config = record.get("config", {})
    contrast = record.get("contrast", config.get("contrast", {}))
    statistics = record.get("statistics", {})
    activations = record.get("activations", {})
    shuffled = None
    if "significant_shuffled" in run.layers.columns:
        shuffled = int(run.layers["significant_shuffled"].sum())
    return _Facts(
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


def _render(run: _Run, *, top: int, examples: int) -> str:
    facts = _facts(run)
    record = run.record
    model = record.get("model", {}).get("name", record.get("config", {}).get("model", "a model"))
    title = (
        f"neuronprobe: which neurons of {model} tell “{facts.positive}” from “{facts.negative}”?"
    )
    sections = [
        _section_answer(run, facts),
        _section_question(run, facts),
        _section_data(run, facts),
        _section_figures(run, facts),
        _section_neurons(run, facts, top=top, examples=examples),
        _section_layers(run, facts),
        _section_caveats(run, facts),
        _section_rerun(run, facts),
    ]
    toc = "".join(f'<li><a href="#{anchor}">{name}</a></li>' for anchor, name in _SECTIONS)
    status = record.get("status", "unknown")
    warning = ""
    if status != "complete":
        warning = (
            f'<p class="warning">run.json says this run is <b>{_text(status)}</b>, not complete: '
            "the tables may be from an earlier or unfinished stage.</p>"
        )
    dates = ", ".join(
        f"{label} {_text(record[key])}"
        for key, label in (("started", "started"), ("probed", "refitted"), ("finished", "finished"))
        if key in record
    )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            # The page may load nothing: no script, no font, no image outside its data URIs.
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            "img-src data:; style-src 'unsafe-inline'\">",
            f"<title>{_text(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{_text(title)}</h1>",
            f'<p class="lead">Run directory <code>{_text(run.directory)}</code>; {dates}.</p>',
            warning,
            f'<nav class="toc"><b>Contents</b><ol>{toc}</ol></nav>',
            *sections,
            "</body>",
            "</html>",
            "",
        ]
    )


def _classes(facts: _Facts) -> str:
    return (
        f'<span class="positive">“{_text(facts.positive)}”</span> and '
        f'<span class="negative">“{_text(facts.negative)}”</span>'
    )


def _correction_words(facts: _Facts, threshold: Any) -> str:
    test = (
        "likelihood-ratio p-value (<code>pvalue_lr</code>)"
        if facts.test == "lr"
        else "Wald p-value (<code>pvalue</code>, the notebook's)"
    )
    alpha = f"{facts.significance:g}"
    if facts.correction == "bonferroni-layer":
        return (
            f"Bonferroni per layer (the notebook's rule): a neuron is significant when its {test} "
            f"is below {alpha} / {facts.per_layer:,} neurons = {_pvalue(threshold)}. This keeps "
            f"the chance of any false positive within a layer at {alpha}; over "
            f"{facts.n_layers} layers at most {facts.n_layers * facts.significance:g} false "
            "positives are expected."
        )
    if facts.correction == "bonferroni":
        return (
            f"Bonferroni over all {facts.total:,} neurons: a neuron is significant when its "
            f"{test} is below {alpha} / {facts.total:,} = {_pvalue(threshold)}; the chance of "
            f"even one false positive in the whole run is at most {alpha}."
        )
    return (
        f"Benjamini-Hochberg over all {facts.total:,} neurons at a false discovery rate of "
        f"{alpha}: a neuron is significant when its {test} is at or below the step-up cut-off "
        f"{_pvalue(threshold)}; on average at most {facts.significance:.0%} of the neurons "
        "called significant are false discoveries (valid for independent or positively "
        "dependent tests)."
    )


def _section_answer(run: _Run, facts: _Facts) -> str:
    layers = run.layers
    ranked = layers.sort_values(["percent_significant", "layer"], ascending=[False, True])
    best = ", ".join(
        f"{int(row.layer)} ({row.percent_significant:.1f}%)" for row in ranked.head(3).itertuples()
    )
    share = facts.significant / facts.total if facts.total else 0.0
    correction = (
        f"by the run's correction (<code>{_text(facts.correction)}</code>, {_text(facts.test)} "
        'test; see <a href="#caveats">how far to trust it</a>)'
    )
    at = f"at the <code>{_text(repr(facts.target))}</code> token"
    if facts.significant:
        items = [
            f"<b>{facts.significant:,} of {facts.total:,} neurons ({share:.1%})</b> tell "
            f"{_classes(facts)} apart {at}, {correction}.",
            f"The layers with the largest share of significant neurons: <b>{best}</b>.",
        ]
    else:
        items = [
            f"<b>0 of {facts.total:,} neurons</b> tell {_classes(facts)} apart {at}, "
            f"{correction}: this run gives no evidence that single neurons carry the distinction "
            "(more contexts, <code>--min-per-class</code>, give the tests more power)."
        ]
    if facts.shuffled is None:
        items.append(
            "No shuffled-label control was run (<code>--no-shuffled-control</code>): nothing here "
            "shows how many neurons would pass by chance."
        )
    else:
        control = (
            "<b>Control:</b> with the training labels shuffled (no real distinction left), "
            f"<b>{facts.shuffled:,}</b> of {facts.total:,} neurons pass the same test, where "
            "none or almost none should."
        )
        if facts.significant and facts.shuffled * 5 <= facts.significant:
            control += (
                f" The gap between {facts.significant:,} and {facts.shuffled:,} is the evidence "
                "that the real labels carry a signal."
            )
        elif facts.significant:
            control += (
                f" <b>That is not far below the {facts.significant:,} that pass with the real "
                "labels: this result is hard to tell from chance.</b>"
            )
        items.append(control)
    significant = run.neurons[run.neurons["significant"].to_numpy(dtype=bool)]
    if len(significant):
        best_test = significant.sort_values(
            ["test_acc", "auc", "layer", "neuron"], ascending=[False, False, True, True]
        ).iloc[0]
        n_test = facts.test_contexts
        mean_test = float(significant["test_acc"].mean())
        items.append(
            f"Single significant neurons predict the class of held-out contexts with "
            f"{mean_test:.1f}% accuracy on average (chance: 50%); the best, "
            f"layer {int(best_test.layer)} neuron {int(best_test.neuron)}, reaches "
            f"{best_test.test_acc:.1f}% (AUC {best_test.auc:.2f})"
            + (f" on {n_test:,} held-out contexts" if n_test else "")
            + (": each neuron alone is a weak signal." if mean_test < 60 else ".")
        )
    weak = _poorly_generalising_layers(run.neurons)
    if weak:
        items.append(
            "Significant is not the same as useful: "
            + "; ".join(
                f"in layer {layer} significant neurons reach {train:.1f}% on training contexts "
                f"but {test:.1f}% on held-out ones"
                for layer, train, test in weak
            )
            + ' (see <a href="#caveats">caveats</a>).'
        )
    return (
        f'<section id="answer"><h2>{_SECTIONS[0][1]}</h2>'
        f'<div class="answer"><ul>{"".join(f"<li>{item}</li>" for item in items)}</ul></div>'
        "</section>"
    )


def _generalisation(neurons: pd.DataFrame) -> pd.DataFrame:
    """Per layer: mean train and test accuracy of the significant neurons, and their gap."""
    significant = neurons[neurons["significant"].to_numpy(dtype=bool)]
    table = significant.groupby("layer")[["train_acc", "test_acc"]].mean()
    table["gap"] = table["train_acc"] - table["test_acc"]
    table["count"] = significant.groupby("layer").size()
    return table


def _poorly_generalising_layers(neurons: pd.DataFrame) -> list[tuple[int, float, float]]:
    """Layers whose significant neurons barely beat chance held out, or overfit unusually.

    A layer is named when the mean held-out accuracy of its significant neurons is below 52%,
    or its train-test gap is more than twice the median gap over layers (and over 2 points).
    """
    table = _generalisation(neurons)
    if table.empty:
        return []
    median_gap = float(table["gap"].median())
    flagged = table[
        (table["test_acc"] < 52.0) | ((table["gap"] > 2 * median_gap) & (table["gap"] > 2.0))
    ]
    return [(int(layer), float(r.train_acc), float(r.test_acc)) for layer, r in flagged.iterrows()]


def _section_question(run: _Run, facts: _Facts) -> str:
    contrast = run.record.get("contrast", {})
    config = run.record.get("config", {})
    target = contrast.get("target", facts.target)
    followers = contrast.get("positive_followers", [])
    negative = contrast.get("negative_followers", [])
    excluded = contrast.get("excluded_followers", [])
    length = contrast.get("context_length")
    model = run.record.get("model", {}).get("name", config.get("model", "the model"))
    description = contrast.get("description")
    rows = [
        ("target (last token of every context)", f"<code>{_text(repr(target))}</code>",
         f"<code>{_text(contrast.get('target_id', '–'))}</code>"),
    ]  # fmt: skip
    # The positive followers; the negative ones, or the exclusions of the default negative
    # rule (a contrast has one or the other, or neither).
    for words, label, ids in (
        (followers, f"followers that make a context “{_text(facts.positive)}”", "positive_ids"),
        (negative, f"followers that make a context “{_text(facts.negative)}”", "negative_ids"),
        (excluded, f"followers excluded from “{_text(facts.negative)}” (first tokens)",
         "excluded_ids"),
    ):  # fmt: skip
        if words or ids == "positive_ids":
            rows.append(
                (label, ", ".join(f"<code>{_text(repr(f))}</code>" for f in words) or "–",
                 f"<code>{_text(contrast.get(ids, '–'))}</code>")
            )  # fmt: skip
    table = _table(["", "text", "token ids"], rows)
    return (
        f'<section id="question"><h2>{_SECTIONS[1][1]}</h2>'
        f"<p>Contexts from real text that end in the same token, <code>{_text(repr(target))}</code>, "
        f"are split by what comes next: {_classes(facts)}. The model reads only the context "
        f"({_text(length)} tokens before the target, and the target), never the next token. "
        f"Question: which neurons of <b>{_text(model)}</b>, read at that last token, already "
        "differ between the two kinds of context, in which layers, and how reliably?</p>"
        + (f"<p>In the run's words: <i>{_text(description)}</i>.</p>" if description else "")
        + table
        + "</section>"
    )


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


def _section_data(run: _Run, facts: _Facts) -> str:
    record = run.record
    model = record.get("model", {})
    corpus = record.get("corpus", {})
    counts = record.get("counts", {})
    activations = record.get("activations", {})
    names = {"positive": f"“{_text(facts.positive)}”", "negative": f"“{_text(facts.negative)}”"}
    count_rows = []
    for key, value in counts.items():
        label = _COUNT_LABELS.get(key, _text(key.replace("_", " ")))
        count_rows.append((label.format(**names), _value(value)))
    reading = [
        ("site", f"<code>{_text(facts.site)}</code>"),
        ("position in the context", f"{facts.position} " + _position_words(facts.position)),
        ("layers", _value(activations.get("layers"))),
        ("array [layers, contexts, neurons]", _value(activations.get("shape"))),
    ]
    split = []
    if facts.train_contexts is not None:
        split.append(("training contexts (fit, p-values)", _int(facts.train_contexts)))
        split.append(("held-out contexts (test accuracy, AUC)", _int(facts.test_contexts)))
    statistics = record.get("statistics", {})
    if "split" in statistics:
        split.append(("split", _text(statistics["split"])))
    return (
        f'<section id="data"><h2>{_SECTIONS[2][1]}</h2>'
        "<h3>Model</h3>"
        + _pairs((_text(k), _value(v)) for k, v in model.items())
        + "<h3>Corpus</h3>"
        + _pairs((_text(k), _value(v)) for k, v in corpus.items())
        + "<h3>Contexts</h3>"
        + _pairs(count_rows)
        + "<h3>What was recorded</h3>"
        + _pairs(reading + split)
        + "</section>"
    )


def _position_words(position: int) -> str:
    if position == -1:
        return "(the target token, the context's last)"
    if position == 0:
        return "(the context's first token)"
    if position < 0:
        return f"({-position - 1} tokens before the target)"
    return f"(token {position} from the start of the context)"


def _section_figures(run: _Run, facts: _Facts) -> str:
    parts = []
    pvalue = "likelihood-ratio" if facts.test == "lr" else "Wald"
    pos, neg = _text(facts.positive), _text(facts.negative)
    for name, png in run.figures:
        match = re.fullmatch(r"(neurons|accuracy)_layer(-?\d+)", name)
        if name == "layers":
            caption = (
                "<b>Laminar profile</b> (the notebook's part 4). A) Percent of each layer's "
                "neurons that are significant; grey crosses: the same with shuffled labels "
                "(chance), where the control was run. B) Mean prediction accuracy of the "
                f"significant neurons, split by the sign of beta (green squares: beta &gt; 0, "
                f"more active before “{pos}”; blue triangles: beta &lt; 0, more active before "
                f"“{neg}”); large markers are training accuracy, small markers on lines held-out "
                "accuracy. 50% is chance."
            )
        elif name == "control":
            caption = (
                "<b>Shuffled-label control</b> per layer: percent of neurons significant with the "
                "real labels (purple) and with the training labels randomly permuted (grey; "
                "outlined so that zero shows as a flat line). Chance alone gives the grey bars."
            )
        elif match and match.group(1) == "neurons":
            caption = (
                f"<b>Every neuron of layer {match.group(2)}</b> (the notebook's part 3a). "
                "A) beta of each neuron by index: red, beta &gt; 0 (more active before "
                f"“{pos}”); green, beta &lt; 0 (more active before “{neg}”); circles are "
                "significant, crosses not. B) -log10 of the "
                f"{pvalue} p-value against beta; the dashed blue line is the significance "
                "threshold (higher is more significant). C, D) the same p-values against each "
                "neuron's training and held-out accuracy; the dashed black line is chance (50%)."
            )
        elif match:
            caption = (
                f"<b>Accuracy of single neurons of layer {match.group(2)}</b> (the notebook's "
                "part 3b): the distribution, over all the layer's neurons, of the accuracy of "
                "each neuron's own probe on the training contexts and on the held-out contexts. "
                "A held-out curve shifted towards 50% (chance) shows how much of the training "
                "accuracy does not carry over to new contexts."
            )
        else:
            caption = f"<code>figures/{_text(name)}.png</code>"
        parts.append(_figure(png, name, caption, f"figure-{name}"))
    if not parts:
        parts.append("<p>The run directory has no figures (<code>figures/*.png</code>).</p>")
    return f'<section id="figures"><h2>{_SECTIONS[3][1]}</h2>{"".join(parts)}</section>'


def _direction_words(beta: float, facts: _Facts) -> str:
    if beta > 0:
        return f'<span class="positive">higher before “{_text(facts.positive)}”</span>'
    if beta < 0:
        return f'<span class="negative">higher before “{_text(facts.negative)}”</span>'
    return "none (beta 0)"


def _section_neurons(run: _Run, facts: _Facts, *, top: int, examples: int) -> str:
    chosen = top_neurons(run.neurons, top, test=facts.test)
    intro = (
        f"<p>The {len(chosen)} significant neurons with the smallest corrected p-value "
        "(<code>pvalue_adj</code>; ties broken by the raw p-value, then by |beta|). beta is the "
        "slope of the neuron's own L1-penalised logistic regression: its sign says which class "
        "the neuron is more active for, its size depends on the neuron's scale (compare p-values "
        "and accuracies across layers, not betas).</p>"
    )
    if chosen.empty:
        chosen = top_neurons(run.neurons, top, significant_only=False, test=facts.test)
        intro = (
            '<p class="warning">No neuron is significant in this run. Shown instead, for '
            f"inspection only: the {len(chosen)} neurons with the smallest corrected p-values, "
            "none of which passes the correction.</p>"
        )
    has_cv = "cv_acc" in chosen.columns and bool(chosen["cv_acc"].notna().any())
    headers = ["#", "layer", "neuron", "beta", "direction", "p (Wald)", "p (LR)", "p adj.",
               "AUC", "train acc.", "test acc."] + (["CV acc."] if has_cv else []) + ["separated"]  # fmt: skip
    numeric = [True, True, True, True, False, True, True, True, True, True, True]
    numeric += [True] * has_cv + [False]
    rows = []
    for rank, row in enumerate(chosen.itertuples(), start=1):
        cells = [
            f'<a href="#neuron-{int(row.layer)}-{int(row.neuron)}">{rank}</a>',
            str(int(row.layer)),
            str(int(row.neuron)),
            _number(row.beta),
            _direction_words(float(row.beta), facts),
            _pvalue(row.pvalue),
            _pvalue(row.pvalue_lr),
            _pvalue(row.pvalue_adj),
            _fixed(row.auc),
            _percent(row.train_acc),
            _percent(row.test_acc),
        ]
        if has_cv:
            cells.append(_percent(row.cv_acc))
        cells.append("yes" if bool(getattr(row, "separated", False)) else "no")
        rows.append(cells)
    table = _table(headers, rows, numeric=numeric, css="wide")
    details = _neuron_examples(run, facts, chosen, examples)
    return (
        f'<section id="neurons"><h2>{_SECTIONS[4][1]}</h2>{intro}{table}'
        "<p>AUC: the probability that the neuron's probe scores a random held-out "
        f"“{_text(facts.positive)}” context above a random held-out “{_text(facts.negative)}” "
        "context (0.5 is chance, 1 is perfect). Accuracies are percentages of contexts "
        "classified correctly by that one neuron; test = held-out contexts.</p>"
        f"{details}</section>"
    )


def _neuron_examples(run: _Run, facts: _Facts, chosen: pd.DataFrame, k: int) -> str:
    if run.contexts is None or run.activations is None or k <= 0:
        missing = "contexts.parquet or activations.npy is missing" if k > 0 else "none asked for"
        return f"<p>No example contexts: {missing}.</p>"
    layer_positions = {layer: i for i, layer in enumerate(facts.layer_numbers)}
    blocks = [
        f"<p>For each neuron, the {k} contexts on which it is most active and the {k} on which "
        "it is least active, with the target token <mark>highlighted</mark> and, in grey after "
        "the arrow, the token that followed in the text (which decides the class; the model "
        "did not see it).</p>"
    ]
    for rank, row in enumerate(chosen.itertuples(), start=1):
        layer, neuron = int(row.layer), int(row.neuron)
        if layer not in layer_positions:
            continue
        found = example_contexts(run.contexts, run.activations, layer_positions[layer], neuron, k)
        halves = []
        for end, label in (("highest", "Most active"), ("lowest", "Least active")):
            part = found[found["end"] == end]
            positives = int((part["class"] == facts.positive).sum())
            table = _table(
                ["activation", "class", "context", "document"],
                (
                    (
                        _fixed(r.activation),
                        _class_html(str(r["class"]), facts),
                        _context_html(str(r.text), facts.target, r.get("next_text")),
                        f"<code>{_text(r.document_id)}</code>",
                    )
                    for _, r in part.iterrows()
                ),
                numeric=[True, False, False, False],
            )
            halves.append(
                f"<div><h4>{label}: {positives} of {len(part)} are “{_text(facts.positive)}”</h4>"
                f"{table}</div>"
            )
        blocks.append(
            f'<div class="neuron" id="neuron-{layer}-{neuron}"><h3>{rank}. Layer {layer}, neuron '
            f"{neuron}: {_direction_words(float(row.beta), facts)}, held-out accuracy "
            f"{_percent(row.test_acc)}, AUC {_fixed(row.auc)}</h3>"
            f'<div class="examples">{"".join(halves)}</div></div>'
        )
    return "".join(blocks)


def _class_html(name: str, facts: _Facts) -> str:
    css = "positive" if name == facts.positive else "negative"
    return f'<span class="{css}">{_text(name)}</span>'


_LAYER_COLUMNS = {
    "layer": ("layer", lambda v: str(int(v))),
    "neurons": ("neurons", _int),
    "significant": ("significant", _int),
    "percent_significant": ("% significant", _percent),
    "significant_positive": ("sig. beta&gt;0", _int),
    "significant_negative": ("sig. beta&lt;0", _int),
    "train_acc_positive": ("train acc. beta&gt;0", _percent),
    "train_acc_negative": ("train acc. beta&lt;0", _percent),
    "test_acc_positive": ("test acc. beta&gt;0", _percent),
    "test_acc_negative": ("test acc. beta&lt;0", _percent),
    "auc_significant": ("AUC (sig.)", _fixed),
    "significant_shuffled": ("sig. shuffled", _int),
    "percent_significant_shuffled": ("% sig. shuffled", lambda v: _percent(v, 2)),
}


def _section_layers(run: _Run, facts: _Facts) -> str:
    layers = run.layers
    columns = list(layers.columns)
    headers = [_LAYER_COLUMNS.get(c, (_text(c), None))[0] for c in columns]
    formats = [_LAYER_COLUMNS.get(c, ("", None))[1] or _number for c in columns]
    rows = [
        [format_(value) for format_, value in zip(formats, record, strict=True)]
        for record in layers.itertuples(index=False)
    ]
    return (
        f'<section id="layers"><h2>{_SECTIONS[5][1]}</h2>'
        "<p>The laminar table (<code>layers.csv</code>): per layer, how many neurons are "
        "significant, split by the sign of beta, the mean training and held-out accuracy of the "
        "significant neurons of each sign, their mean held-out AUC, and how many pass with "
        "shuffled labels.</p>"
        + _table(headers, rows, numeric=[True] * len(columns), css="wide laminar")
        + "</section>"
    )


def _section_caveats(run: _Run, facts: _Facts) -> str:
    statistics = run.record.get("statistics", {})
    threshold = statistics.get("pvalue_threshold", run.neurons["pvalue_threshold"].iloc[0])
    items = [f"<b>Multiple comparisons.</b> {_correction_words(facts, threshold)}"]
    wald_use = (
        "This run's decisions use the Wald test, so these neurons' significance is doubtful; "
        "<code>neuronprobe probe --out DIR --test lr</code> refits with the likelihood-ratio test."
        if facts.test == "wald"
        else "This run's decisions use the likelihood-ratio test, which stays valid there."
    )
    items.append(
        "<b>Wald p-values and separation.</b> The Wald p-value (<code>pvalue</code>, the "
        "notebook's) is unreliable when a neuron (nearly) separates the classes: the slope and "
        "its standard error both grow large. The likelihood-ratio p-value (<code>pvalue_lr</code>)"
        f" is valid there. <b>{facts.separated:,}</b> of {facts.total:,} neurons separate the "
        "training classes perfectly (<code>separated</code>)"
        + (f". {wald_use}" if facts.separated else "; none is affected.")
    )
    n_test = facts.test_contexts
    if n_test:
        se = 100 * math.sqrt(0.25 / n_test)
        split_words = (
            f"one stratified train/test split shared by all neurons ({facts.train_contexts:,} "
            f"training and {n_test:,} held-out contexts). p-values come from the training "
            "contexts, accuracies and AUC from the held-out ones. With "
            f"{n_test:,} held-out contexts, one neuron's held-out accuracy has a standard error "
            f"of about {se:.1f} points near 50%, and the best accuracy among many neurons is "
            "optimistic (it is the maximum of many noisy numbers)."
        )
    else:
        split_words = "one train/test split shared by all neurons."
    config = run.record.get("config", {})
    if not config.get("split_by_document", False) and run.contexts is not None:
        per_document = run.contexts["document_id"].value_counts()
        shared = int((per_document > 1).sum())
        if shared:
            split_words += (
                f" {shared:,} documents gave more than one context, and the split does not keep "
                "a document's contexts together, so held-out contexts can share text with "
                "training ones (<code>--split-by-document</code> prevents it)."
            )
    items.append(
        f"<b>One split.</b> All numbers come from {split_words} A new split "
        "(<code>neuronprobe probe --out DIR --seed S</code>) or cross-validation "
        "(<code>--cv 5</code>) shows how much they move."
    )
    items.append(
        "<b>AUC</b> is the held-out ROC AUC of each neuron's probe: the probability that it "
        f"scores a random “{_text(facts.positive)}” context above a random "
        f"“{_text(facts.negative)}” one; 0.5 is chance. Unlike accuracy it does not depend on the "
        "probe's intercept."
    )
    generalisation = _generalisation(run.neurons)
    if not generalisation.empty:
        worst = generalisation["test_acc"].idxmin()
        best = generalisation["test_acc"].idxmax()
        words = (
            "<b>Significant yet poorly generalising.</b> A neuron can pass the test on the "
            "training contexts and still predict new contexts little better than chance. Mean "
            "held-out accuracy of the significant neurons ranges from "
            f"{generalisation.loc[worst, 'test_acc']:.1f}% (layer {int(worst)}, training "
            f"{generalisation.loc[worst, 'train_acc']:.1f}%) to "
            f"{generalisation.loc[best, 'test_acc']:.1f}% (layer {int(best)}, training "
            f"{generalisation.loc[best, 'train_acc']:.1f}%)."
        )
        weak = _poorly_generalising_layers(run.neurons)
        if weak:
            words += " Notably: " + "; ".join(
                f"layer {layer}, {train:.1f}% training against {test:.1f}% held out"
                for layer, train, test in weak
            )
            words += (
                ". There the difference a neuron shows on the training contexts is too small, or "
                "too specific to them, to predict new contexts: a small p-value alone does not "
                "make a neuron a usable predictor."
            )
        items.append(words)
    items.append(
        f"<b>Where the neurons are read.</b> Site <code>{_text(facts.site)}</code>"
        f"{_site_words(facts.site)}, at position {facts.position} "
        f"{_position_words(facts.position)}. Other sites or positions can give another picture "
        "(<code>--site</code>, <code>--position</code>)."
    )
    items.append(
        "<b>Correlation, not mechanism.</b> A significant neuron's activation differs between the "
        "two kinds of context; that does not show that the model uses it to predict the next "
        "token. The classes are balanced by sampling (chance is 50%), and exact duplicate "
        "contexts were "
        + (
            "dropped."
            if run.record.get("config", {}).get("drop_duplicates", True)
            else "kept (<code>--keep-duplicates</code>): repeated contexts can inflate significance."
        )
    )
    if facts.not_converged or facts.constant:
        items.append(
            f"<b>Fits.</b> {facts.not_converged:,} neurons' regressions did not reach their "
            f"optimum (<code>converged</code>) and {facts.constant:,} neurons are constant on the "
            "training contexts (no slope fitted)."
        )
    body = "".join(f"<li>{item}</li>" for item in items)
    return f'<section id="caveats"><h2>{_SECTIONS[6][1]}</h2><ul>{body}</ul></section>'


def _site_words(site: str) -> str:
    return {
        "mlp.pre": " (the MLP expansion before its non-linearity, as the notebook)",
        "mlp.post": " (the MLP expansion after its non-linearity: the down projection's input)",
        "resid.post": " (the block's output hidden state, not MLP neurons)",
    }.get(site, "")


def _section_rerun(run: _Run, facts: _Facts) -> str:
    record = run.record
    directory = _text(run.directory)
    config = record.get("config", {})
    commands = (
        f"# the whole run again, same settings (a new run directory, runs/&lt;time&gt; or --out)\n"
        f"neuronprobe run --config {directory}/run.json\n\n"
        "# refit the statistics of this run from its stored activations (no model needed);\n"
        "# earlier tables and figures are kept in history/\n"
        f"neuronprobe probe --out {directory} [--correction fdr-bh] [--test lr] [--seed S] [--cv 5]\n\n"
        "# this page again\n"
        f"neuronprobe report --out {directory}"
    )
    # The report's own time is not shown: it is known only after the page is written, and
    # leaving it out keeps `neuronprobe report` byte-identical for the same run directory.
    timings = {k: v for k, v in record.get("timings_s", {}).items() if k != "report"}
    statistics = record.get("statistics", {})
    return (
        f'<section id="rerun"><h2>{_SECTIONS[7][1]}</h2>'
        f"<p>Seed <b>{_text(record.get('seed', config.get('seed', '–')))}</b> drives every random "
        "choice (the balancing sample, the split, the folds, the shuffled labels).</p>"
        f"<pre>{commands}</pre>"
        "<h3>Configuration (run.json <code>config</code>)</h3>"
        + _pairs(
            (_text(k), "all" if k == "layers" and v is None else _value(v))
            for k, v in config.items()
        )
        + "<h3>Statistics (run.json <code>statistics</code>)</h3>"
        + _pairs((_text(k), _value(v)) for k, v in statistics.items())
        + "<h3>Versions</h3>"
        + _pairs((_text(k), _value(v)) for k, v in record.get("versions", {}).items())
        + "<h3>Seconds per stage</h3>"
        + _pairs((_text(k), _value(v)) for k, v in timings.items())
        + "</section>"
    )
