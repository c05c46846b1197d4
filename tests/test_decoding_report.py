"""The report's answer to "how much does each layer know?": the decoding section, the best
layer's AUC in the opening (effect sizes before the count of significant neurons), the
decoding figure, and decoding_summary.

The run is real (the small random GPT-2 of conftest, the real GPT-2 tokenizer, the real movie
reviews, layers 1 and 3, as tests/test_report.py). Its ``decoding.csv`` is made here by the real
:func:`neuronprobe.decoding.decode_layers` on the run's own activations, with a signal planted in
three neurons of layer 3 (the random model has none of its own), so that the section has a best
layer, a smallest k and a control to speak of. Every expected number is read back from that
table, never typed in.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from neuronprobe import RunConfig, run
from neuronprobe.decoding import decode_layers
from neuronprobe.errors import NeuronprobeError
from neuronprobe.figures import decoding_figure, save_figure
from neuronprobe.report import SECTIONS, decoding_summary, write_report

LAYERS = [1, 3]
PLANTED = (5, 17, 40)  # neurons of layer 3 (index 1 of activations.npy) given a signal
SEED = 3
CV = 5
BEHAVIOR = {"auc": 0.734, "accuracy": 68.8, "test_contexts": 16, "train_contexts": 64}


@pytest.fixture(scope="module")
def tiny_run(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    config = RunConfig(model=str(tiny_gpt2_dir), min_per_class=40, seed=SEED, layers=LAYERS)
    return run(config, tmp_path_factory.mktemp("runs") / "tiny", progress=False)


def remove_decoding(directory: Path) -> None:
    """The run directory without the decoding stage's files, whatever today's run writes."""
    record = json.loads((directory / "run.json").read_text())
    record.pop("decoding", None)
    (directory / "run.json").write_text(json.dumps(record))
    for path in (directory / "decoding.csv", *(directory / "figures").glob("decoding.*")):
        path.unlink(missing_ok=True)


def planted_decoding(directory: Path) -> pd.DataFrame:
    """decode_layers on the run's activations, three neurons of layer 3 shifted by 1.2 of their
    standard deviations in the positive contexts."""
    labels = pd.read_parquet(directory / "contexts.parquet")["label"].to_numpy(dtype=bool)
    activations = np.load(directory / "activations.npy").astype(np.float64)
    layer = LAYERS.index(3)
    for neuron in PLANTED:
        activations[layer, labels, neuron] += 1.2 * activations[layer, :, neuron].std()
    return decode_layers(activations, labels, cv=CV, seed=SEED, layers=LAYERS)


def add_decoding(directory: Path, table: pd.DataFrame) -> None:
    """The decoding stage's files as the run writes them (decoding.csv, figures/decoding,
    run.json's entry), and the model's own AUC to compare with."""
    record = json.loads((directory / "run.json").read_text())
    record["behavior"] = {**record.get("behavior", {}), **BEHAVIOR}
    table.to_csv(directory / "decoding.csv", index=False)
    figure = decoding_figure(table, model_auc=BEHAVIOR["auc"])
    save_figure(figure, directory / "figures" / "decoding")
    record["decoding"] = {
        "file": "decoding.csv",
        "rows": len(table),
        "k": sorted(set(table["k"]), key=lambda k: math.inf if k == "all" else int(k)),
        "cv": CV,
        "C": 1.0,
        "seed": SEED,
        "test": "wald",
        "grouped": False,
        "figures": ["decoding"],
    }
    (directory / "run.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def decoded(tiny_run: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A copy of the run with the planted decoding, its table and its page."""
    directory = tmp_path_factory.mktemp("copy") / "run"
    shutil.copytree(tiny_run.directory, directory)
    remove_decoding(directory)
    table = planted_decoding(directory)
    add_decoding(directory, table)
    page = write_report(directory, top=2, examples=1).read_text(encoding="utf-8")
    return {"directory": directory, "table": table, "page": page}


def section(page: str, anchor: str) -> str:
    start = page.index(f'<section id="{anchor}">')
    return page[start : page.index("</section>", start)]


def flat(page: str) -> str:
    """The page with each run of white space (the templates' line breaks) as one space."""
    return " ".join(page.split())


def words(text: str) -> str:
    """Text as the page shows a value: HTML-escaped."""
    return html.escape(text, quote=True)


def best_row(table: pd.DataFrame) -> pd.Series:
    """The probe with the highest AUC (the table is layer-major, k increasing: the first of a
    tie is the lower layer, then the fewer neurons)."""
    return table.loc[table["cv_auc"].idxmax()]


def test_the_section_sits_between_the_neurons_and_the_interventions(
    decoded: dict[str, Any],
) -> None:
    page = decoded["page"]
    anchors = re.findall(r'<section id="([a-z]+)">', page)
    assert anchors == [s.anchor for s in SECTIONS]
    assert anchors.index("decoding") == anchors.index("neurons") + 1
    assert anchors.index("interventions") == anchors.index("decoding") + 1
    assert '<li><a href="#decoding">How much does each layer know?</a></li>' in page
    assert "<h2>How much does each layer know?</h2>" in page
    # The figure is in the figures section, with its caption, and linked from the section.
    figures = section(page, "figures")
    assert '<figure id="figure-decoding"><img src="data:image/png;base64,' in figures
    caption = flat(figures.split('<figure id="figure-decoding">')[1].split("</figure>")[0])
    assert "one line per k" in caption and "Grey band: the same procedure with shuffled" in caption
    assert "Dashed red line" in caption and "the model's own held-out AUC" in caption
    assert 'href="#figure-decoding"' in section(page, "decoding")
    assert "data:image" not in section(page, "decoding")


def test_the_answer_in_plain_words(decoded: dict[str, Any], tiny_run: Any) -> None:
    table, shown = decoded["table"], flat(section(decoded["page"], "decoding"))
    best = best_row(table)
    layer = table[table["layer"] == best.layer]
    whole = layer[layer["k"] == "all"].iloc[0]
    assert best.layer == 3  # the planted layer
    neurons = "neurons" if best.neurons_used > 1 else "neuron"
    strongest = (
        f"the {best.neurons_used} strongest {neurons} of layer 3"
        if best.k != "all"
        else f"all {best.neurons_used} neurons of layer 3"
    )
    assert "<li><b>Layer 3 knows the most.</b> Read together by a cross-validated probe, " in shown
    assert words(f"{strongest} {'tell' if best.neurons_used > 1 else 'tells'} ") in shown
    assert f"with an AUC of {best.cv_auc:.3f}" in shown
    if best.k != "all":
        assert f"all {whole.neurons_used} of its neurons, {whole.cv_auc:.3f}." in shown
    # The smallest k whose AUC - 0.5 is at least 0.9 of the best layer's (best AUC - 0.5).
    margin = 0.9 * (best.cv_auc - 0.5)
    enough = layer.sort_values("neurons_used")
    enough = enough[enough["cv_auc"] - 0.5 >= margin].iloc[0]
    count = "The whole layer" if enough.k == "all" else f"{enough.neurons_used} neuron"
    assert f"<li><b>{count}" in shown and "carry most of it.</b>" in shown
    assert f"reach AUC {enough.cv_auc:.3f}" in shown or f"reaches AUC {enough.cv_auc:.3f}" in shown
    assert (
        words(
            f"the smallest k tried (1, 2, 5, 10, 20, 50, 100 and the whole layer) with AUC − 0.5 ≥ "
            f"0.9 × ({best.cv_auc:.3f} − 0.5), that is AUC ≥ {0.5 + margin:.3f}."
        )
        in shown
    )
    if isinstance(enough.selected, str) and enough.selected:
        chosen = enough.selected.split()
        listed = chosen[0] if len(chosen) == 1 else ", ".join(chosen[:-1]) + " and " + chosen[-1]
        assert f"chosen in every fold: {listed}." in shown
    # One neuron: the best k = 1 probe, and the neuron table's best held-out AUC.
    single = table[table["k"] == "1"].sort_values("cv_auc", ascending=False).iloc[0]
    assert (
        f"The best one-neuron probe (k = 1, at layer {single.layer}) reaches AUC "
        f"{single.cv_auc:.3f}, against {best.cv_auc:.3f} for the best probe" in shown
    )
    table_neurons = tiny_run.neurons
    significant = table_neurons[table_neurons["significant"]]
    pool = significant if len(significant) else table_neurons
    top = pool.loc[pool["auc"].idxmax()]
    assert (
        words(
            f"The neuron table's best held-out AUC, {top.auc:.3f} (layer {top.layer}, neuron "
            f"{top.neuron}), is the largest of {len(pool)} "
        )
        in shown
    )
    # The model's own answer: run.json's behavior.auc.
    compared = "better than" if best.cv_auc > BEHAVIOR["auc"] else "less well than"
    assert (
        words(
            f"Read at its output, the model reaches a held-out AUC of {BEHAVIOR['auc']:.3f}: the "
            f"best probe tells the classes apart {compared} the model's output does "
            f"({best.cv_auc:.3f} against {BEHAVIOR['auc']:.3f})."
        )
        in shown
    )
    assert "the model on the 16 held-out contexts of the split, the probes by 5-fold" in shown
    # The control's range over every layer and k.
    low, high = table["shuffled_auc"].min(), table["shuffled_auc"].max()
    assert (
        f"with the labels shuffled, the same procedure gives AUCs from {low:.3f} to {high:.3f}"
        in shown
    )
    assert "with 40 and 40 contexts of the two classes, chance alone moves an AUC by about" in (
        shown
    )
    assert "stratified 5-fold cross-validation (seed 3)" in shown
    # A leak is named only where a shuffled AUC is above max(0.6, 0.5 + 3 chance sd).
    threshold = max(0.6, 0.5 + 3 * math.sqrt(81 / (12 * 40 * 40)))
    assert ("something leaks" in shown) == bool((table["shuffled_auc"] > threshold).any())


def test_one_row_per_layer_with_the_tables_numbers(decoded: dict[str, Any]) -> None:
    table, shown = decoded["table"], section(decoded["page"], "decoding")
    head = shown[shown.index("<thead>") : shown.index("</thead>")]
    assert re.findall(r"<th class=num>(.*?)</th>", head) == [
        "layer", "k = 1", "k = 2", "k = 5", "k = 10", "k = 20", "k = 50", "k = 100",
        "whole layer", "shuffled labels",
    ]  # fmt: skip
    body = shown[shown.index("<tbody>") : shown.index("</tbody>")]
    rows = re.findall(r"<tr>(.*?)</tr>", body)
    assert len(rows) == len(LAYERS)
    best = best_row(table)
    for row, layer in zip(rows, LAYERS, strict=True):
        cells = re.findall(r"<td class=num>(.*?)</td>", row)
        part = table[table["layer"] == layer]
        expected = [f"{r.cv_auc:.3f} ± {r.cv_auc_sd:.2f}" for r in part.itertuples()]
        if layer == best.layer:  # the best probe in bold
            position = list(part["k"]).index(best.k)
            expected[position] = f"<b>{expected[position]}</b>"
        low, high = part["shuffled_auc"].min(), part["shuffled_auc"].max()
        assert cells == [str(layer), *expected, f"{low:.3f}–{high:.3f}"]


def test_the_opening_leads_with_effect_sizes(decoded: dict[str, Any], tiny_run: Any) -> None:
    table, answer = decoded["table"], flat(section(decoded["page"], "answer"))
    items = re.findall(r"<li>(.*?)</li>", answer)
    best = best_row(table)
    whole = table[(table["layer"] == best.layer) & (table["k"] == "all")].iloc[0]
    # 1. the model's own AUC, 2. the best layer's probe, 3. the best single neuron, then the
    # count of significant neurons, with what the count depends on.
    assert "<b>The model itself</b>" in items[0] and f"<b>{BEHAVIOR['auc']:.2f}</b>" in items[0]
    assert items[1].startswith("<b>Layer 3's neurons together</b> (a cross-validated probe")
    assert f"with an AUC of <b>{best.cv_auc:.2f}</b>" in items[1]
    if best.k != "all":
        assert f"; all {whole.neurons_used} of its neurons, {whole.cv_auc:.2f}" in items[1]
    assert '<a href="#decoding">how much each layer knows</a>' in items[1]
    neurons = tiny_run.neurons
    pool = neurons[neurons["significant"]] if neurons["significant"].any() else neurons
    top = pool.loc[pool["auc"].idxmax()]
    assert items[2].startswith(f"<b>The best single neuron</b>, layer {top.layer} neuron")
    assert f"held-out AUC of <b>{top.auc:.2f}</b>" in items[2]
    significant = int(neurons["significant"].sum())
    assert f"<b>{significant:,} of {len(neurons):,} neurons" in items[3]
    assert (
        "This count depends on the number of contexts as much as on the effect: with more "
        "contexts (<code>--min-per-class</code>), more neurons pass the same threshold, so it "
        "measures the sample size as much as the signal; the AUCs above are the size of the "
        "effect." in items[3]
    )


def test_a_leaking_control_is_named(decoded: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(decoded["directory"], copy)
    # A real decoding.csv, edited: one shuffled-label AUC set far above chance (0.91), as a
    # leak between folds would make it.
    table = pd.read_csv(copy / "decoding.csv", dtype={"k": str, "selected": str})
    at = table.index[(table["layer"] == 1) & (table["k"] == "5")][0]
    table.loc[at, "shuffled_auc"] = 0.91
    table.to_csv(copy / "decoding.csv", index=False)
    shown = flat(section(write_report(copy).read_text(encoding="utf-8"), "decoding"))
    warning = (
        '<p class="warning"><b>The control is not at chance: something leaks.</b> With '
        "shuffled labels, layer 1 with k = 5 (0.910) reaches an AUC above 0.695"
    )
    assert warning in shown
    assert "(the folds were not grouped by document)" in shown
    assert "gives AUCs from" in shown and "to 0.910 over all layers and k" in shown


def test_without_decoding_the_page_leaves_it_out(decoded: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(decoded["directory"], copy)
    remove_decoding(copy)
    page = write_report(copy, top=2, examples=1).read_text(encoding="utf-8")
    assert 'id="decoding"' not in page and 'href="#decoding"' not in page
    assert "How much does each layer know?" not in page and "figure-decoding" not in page
    answer = flat(section(page, "answer"))
    items = re.findall(r"<li>(.*?)</li>", answer)
    # The opening without the probes: the model, the best single neuron, then the count.
    assert "The model itself" in items[0] and "The best single neuron" in items[1]
    assert "neurons together" not in answer
    # A run whose decoding was skipped: one sentence, and the reason.
    record = json.loads((copy / "run.json").read_text())
    record["decoding"] = {"skipped": "--no-decoding"}
    (copy / "run.json").write_text(json.dumps(record))
    page = write_report(copy, top=2, examples=1).read_text(encoding="utf-8")
    assert section(page, "decoding") == (
        '<section id="decoding"><h2>How much does each layer know?</h2>\n'
        "<p>The decoding probes were not run (--no-decoding).</p>\n"
    )
    assert "neurons together" not in section(page, "answer")


def test_a_damaged_decoding_table_is_named(decoded: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(decoded["directory"], copy)
    table = pd.read_csv(copy / "decoding.csv", dtype={"k": str})
    table.drop(columns=["cv_auc"]).to_csv(copy / "decoding.csv", index=False)
    with pytest.raises(NeuronprobeError, match="decoding.csv is without the column 'cv_auc'"):
        write_report(copy)
    table.iloc[:-1].to_csv(copy / "decoding.csv", index=False)
    with pytest.raises(NeuronprobeError, match="decoding.csv is holding 15 rows"):
        write_report(copy)


def test_decoding_summary_rules(decoded: dict[str, Any]) -> None:
    table = decoded["table"]
    summary = decoding_summary(table, class_sizes=(40, 40))
    best = best_row(table)
    assert (summary.best_layer, summary.best_k) == (best.layer, best.k)
    assert summary.best_auc == best.cv_auc
    layer = table[table["layer"] == best.layer].sort_values("neurons_used")
    passing = layer[layer["cv_auc"] - 0.5 >= 0.9 * (best.cv_auc - 0.5)]
    assert summary.enough_k == passing["k"].iloc[0]
    assert summary.enough_threshold == pytest.approx(0.5 + 0.9 * (best.cv_auc - 0.5))
    assert summary.chance_sd == pytest.approx(math.sqrt(81 / (12 * 40 * 40)))
    assert summary.leak_threshold == pytest.approx(0.5 + 3 * summary.chance_sd)
    # Without the class sizes the leak threshold is 0.6.
    assert decoding_summary(table).leak_threshold == 0.6
    # Nothing above chance: no "fewest neurons"; no whole-layer probe: no whole-layer AUC.
    flat_table = table.assign(cv_auc=0.5 - table["cv_auc"].rank() / 1000)
    nothing = decoding_summary(flat_table)
    assert nothing.best_auc < 0.5 and nothing.enough_k is None and math.isnan(nothing.enough_auc)
    partial = decoding_summary(table[table["k"] != "all"])
    assert math.isnan(partial.whole_auc) and partial.whole_neurons is None
    # Ties: the lower layer, then the fewer neurons.
    tied = table.assign(cv_auc=0.8)
    assert (decoding_summary(tied).best_layer, decoding_summary(tied).best_k) == (1, "1")
    with pytest.raises(ValueError, match="no column 'cv_auc'"):
        decoding_summary(table.drop(columns=["cv_auc"]))
