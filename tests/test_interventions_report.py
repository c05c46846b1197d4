"""The report's answer to "does the model use these neurons?": the interventions section, the
model's own AUC in the opening summary, the interventions figure, and intervention_effects.

The run is real (the small random GPT-2 of conftest, the real GPT-2 tokenizer, the real movie
reviews, layers 1 and 3, as tests/test_report.py); its ``behavior`` entry and its
``interventions.parquet`` are written here with known numbers, so that every sentence and every
verdict of the page can be checked against a hand computation.
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
from matplotlib.figure import Figure

from neuronprobe import RunConfig, run
from neuronprobe.figures import interventions_figure, save_figure
from neuronprobe.report import SECTIONS, intervention_effects, write_report

LAYERS = [1, 3]
DRAWS = 5
BEHAVIOR = {
    "auc": 0.80,
    "accuracy": 73.1,
    "threshold": -2.3,
    "train_contexts": 801,
    "test_contexts": 201,
    "positive_first_ids": [470],
    "measure": "logodds_positive",
}
SETTINGS = {
    "ablation": "mean",
    "ablate_k": ["10", "all"],
    "random_draws": DRAWS,
    "site": "mlp.pre",
    "seed": 0,
    "contexts": 201,
}


def interventions_table() -> pd.DataFrame:
    """Known interventions at layers 1 and 3 and the whole model (-1), AUC 0.80 before.

    Each narrows the gap between the classes' log-odds by ``drop`` (the positive class's
    log-odds fall by it, the negative class's stay) and lowers the AUC by as much.
    k_label "10": layer 1's 10 neurons narrow it by 0.06, above every draw (0.00 to 0.04);
    layer 3 has only 4 significant neurons, whose 0.02 is inside its draws' band (0.00 to 0.04;
    two draws reach it); the whole model (14 neurons) narrows it by 0.15.
    k_label "all": layer 1's 37 significant neurons narrow it by 0.10; layer 3 has no top row
    (and no draws) for it; the whole model (41 neurons) narrows it by 0.20.
    """
    rows: list[dict[str, Any]] = []

    def add(layer: int, k: int, label: str, top: float, draws: list[float]) -> None:
        for selection, draw, drop in [("top", 0, top)] + [
            ("random", i, d) for i, d in enumerate(draws, start=1)
        ]:
            rows.append(
                {
                    "layer": layer,
                    "k": k,
                    "k_label": label,
                    "selection": selection,
                    "draw": draw,
                    "ablation": "mean",
                    "contexts": 201,
                    "delta_logodds_positive": -drop,
                    "delta_logodds_negative": 0.0,
                    "auc_before": 0.80,
                    "auc_after": round(0.80 - drop, 6),
                }
            )

    add(1, 10, "10", 0.06, [0.01, 0.02, 0.03, 0.00, 0.04])
    add(3, 4, "10", 0.02, [0.01, 0.03, 0.00, 0.02, 0.04])
    add(-1, 14, "10", 0.15, [0.02, 0.03, 0.01, 0.05, 0.04])
    add(1, 37, "all", 0.10, [0.02, 0.02, 0.03, 0.01, 0.02])
    add(-1, 41, "all", 0.20, [0.05, 0.04, 0.06, 0.05, 0.05])
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tiny_run(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    config = RunConfig(model=str(tiny_gpt2_dir), min_per_class=40, seed=3, layers=LAYERS)
    return run(config, tmp_path_factory.mktemp("runs") / "tiny", progress=False)


def remove_interventions(directory: Path) -> None:
    """The run directory as an older run wrote it: no behaviour, no interventions, whatever
    today's run writes."""
    record = json.loads((directory / "run.json").read_text())
    record.pop("behavior", None)
    record.pop("interventions", None)
    figures = record["statistics"].get("figures", [])
    record["statistics"]["figures"] = [name for name in figures if name != "interventions"]
    (directory / "run.json").write_text(json.dumps(record))
    for path in (
        directory / "interventions.parquet",
        *(directory / "figures").glob("interventions.*"),
    ):
        path.unlink(missing_ok=True)


def add_interventions(directory: Path, *, figure: bool = True) -> None:
    """The run's behaviour and interventions, as the run writes them, and their figure."""
    record = json.loads((directory / "run.json").read_text())
    record["behavior"] = BEHAVIOR
    record["interventions"] = SETTINGS
    table = interventions_table()
    table.to_parquet(directory / "interventions.parquet", index=False)
    if figure:
        contrast = record["contrast"]
        drawn = interventions_figure(
            table, positive=contrast["positive_name"], negative=contrast["negative_name"]
        )
        save_figure(drawn, directory / "figures" / "interventions")
        record["statistics"]["figures"] = [*record["statistics"]["figures"], "interventions"]
    (directory / "run.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def pages(tiny_run: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The same run directory's page before and after its interventions were added."""
    directory = tmp_path_factory.mktemp("copy") / "run"
    shutil.copytree(tiny_run.directory, directory)
    remove_interventions(directory)
    before = write_report(directory, top=2, examples=1).read_text(encoding="utf-8")
    add_interventions(directory)
    after = write_report(directory, top=2, examples=1).read_text(encoding="utf-8")
    return {"before": before, "after": after, "directory": str(directory)}


def section(page: str, anchor: str) -> str:
    start = page.index(f'<section id="{anchor}">')
    return page[start : page.index("</section>", start)]


def words(text: str) -> str:
    """Text as the page shows a value: HTML-escaped."""
    return html.escape(text, quote=True)


def flat(page: str) -> str:
    """The page with each run of white space (the templates' line breaks) as one space."""
    return " ".join(page.split())


def test_the_section_sits_after_the_strongest_neurons(pages: dict[str, str]) -> None:
    page = pages["after"]
    anchors = re.findall(r'<section id="([a-z]+)">', page)
    # Every section, in order; the decoding's only where the run has decoding.csv.
    assert anchors == [s.anchor for s in SECTIONS if s.anchor in anchors]
    assert set(anchors) >= {s.anchor for s in SECTIONS} - {"decoding"}
    between = anchors[anchors.index("neurons") + 1 : anchors.index("interventions")]
    assert between in ([], ["decoding"])
    assert re.findall(r'<li><a href="#([a-z]+)">', page) == anchors
    assert "<h2>Does the model use these neurons?</h2>" in page
    # The figure is referred to, not embedded twice: the figures section shows it.
    assert 'href="#figure-interventions"' in section(page, "interventions")
    assert "data:image" not in section(page, "interventions")
    assert '<figure id="figure-interventions">' in section(page, "figures")
    assert all(href.startswith("#") for href in re.findall(r'href="([^"]*)"', page))


def test_the_answer_in_plain_words(pages: dict[str, str]) -> None:
    shown = flat(section(pages["after"], "interventions"))
    # k = 10: layer 1 beats all 5 draws; z = (0.06 - 0.02) / sd(0.01, 0.02, 0.03, 0.00, 0.04)
    # = 0.04 / 0.0158 = 2.53.
    assert (
        words(
            "Setting the 10 strongest neurons of layer 1 to their training mean narrows the gap "
            "between the model's own log-odds in the two classes by 0.060 (held-out AUC 0.80 → "
            "0.74), more than any of 5 random draws of 10 neurons from the same layer (z = 2.5)."
        )
        in shown
    )
    assert "do <b>more than random</b> neurons in <b>layer 1</b>." in shown
    # Layer 3's effect (0.02) is inside its band (0.00 to 0.04): no more than random.
    assert "In layer 3 they do <b>no more than random neurons</b> of the same layer" in shown
    # The whole model, k = 10 per layer: 0.15 against draws of at most 0.05.
    whole = words(
        "Setting the 10 strongest significant neurons of every layer at once (14 neurons) to "
        "their training mean narrows the gap between the model's own log-odds in the two "
        "classes by 0.150 (held-out AUC 0.80 → 0.65), more than any of 5 random draws of 14 "
        "neurons from the same layers (z = 7.6)."
    )
    assert f"<li><b>The whole model.</b> {whole}</li>" in shown
    # k = all: layer 3 has no significant neuron.
    assert (
        words(
            "Setting all 37 significant neurons of layer 1 to their training mean narrows the gap "
            "between the model's own log-odds in the two classes by 0.100 (held-out AUC 0.80 → "
            "0.70), more than any of 5 random draws of 37 neurons from the same layer (z = 11.3)."
        )
        in shown
    )
    assert "<li>Layer 3: no significant neuron, nothing to change.</li>" in shown
    # The control and the ablation, each in one sentence.
    assert "the same change made to as many neurons drawn at random from the same layer" in shown
    assert "(5 seeded draws, seed 0)" in shown
    assert "<code>mean</code> ablation, at <code>mlp.pre</code>" in shown
    assert "each changed neuron is set to its mean over the training contexts" in shown


def test_one_table_per_k_with_the_hand_computed_numbers(pages: dict[str, str]) -> None:
    shown = section(pages["after"], "interventions")
    tables = re.findall(r"<tbody>(.*?)</tbody>", shown, flags=re.S)
    assert len(tables) == 2  # k_label "10" and "all"
    rows = [re.findall(r"<tr>(.*?)</tr>", table) for table in tables]
    cells = [[re.findall(r"<td[^>]*>(.*?)</td>", row) for row in part] for part in rows]
    ten, everything = cells
    assert [row[0] for row in ten] == ["1", "3", "all layers"]
    assert ten[0] == [
        "1", "10", "0.800 → 0.740", "+0.060", "+0.020 ± 0.016", "+0.000 to +0.040", "1 of 6",
        "2.5", "-0.06", "+0.00", "<b>more than random</b>",
    ]  # fmt: skip
    # Layer 3: 3 of the 5 draws narrow the gap by 0.02 or more: rank 4; z = 0.
    assert ten[1] == [
        "3", "4", "0.800 → 0.780", "+0.020", "+0.020 ± 0.016", "+0.000 to +0.040", "4 of 6",
        "0.0", "-0.02", "+0.00", "no more than random neurons",
    ]  # fmt: skip
    assert [row[0] for row in everything] == ["1", "3", "all layers"]
    assert everything[1] == ["3", "–", "–", "–", "–", "–", "–", "–", "–", "–",
                             "no significant neuron"]  # fmt: skip
    assert everything[2][-1] == "<b>more than random</b>"


def test_the_opening_summary_gives_the_models_own_auc(pages: dict[str, str], tiny_run: Any) -> None:
    answer = flat(section(pages["after"], "answer"))
    neurons = tiny_run.neurons
    significant = neurons[neurons["significant"]]
    pool = significant if len(significant) else neurons
    best = pool.loc[pool["auc"].idxmax()]
    item = (
        "<li><b>The model itself</b>, read at its output (the log-odds of “can&#x27;t”), tells "
        '<span class="positive">“can&#x27;t”</span> and <span class="negative">“can”</span> '
        "apart with a held-out AUC of <b>0.80</b> (accuracy 73.1% on 201 held-out contexts)."
    )
    assert item in answer
    single = (
        f"<b>The best single neuron</b>, layer {int(best.layer)} neuron {int(best.neuron)}, "
        f"tells the two classes apart with a held-out AUC of <b>{best.auc:.2f}</b>"
    )
    assert single in answer
    assert '<a href="#interventions">changing them</a>' in answer
    # Effect sizes first: the model's own AUC opens the answer, the single neuron's follows it
    # (after the decoding's, where the run has one), and the count of significant neurons comes
    # after both.
    items = re.findall(r"<li>(.*?)</li>", answer)
    assert "The model itself" in items[0]
    position = next(i for i, text in enumerate(items) if "The best single neuron" in text)
    assert position in (1, 2)
    count = next(i for i, text in enumerate(items) if " of 512 neurons" in text)
    assert count == position + 1


def test_a_run_without_them_has_the_page_it_had(pages: dict[str, str], tmp_path: Path) -> None:
    before = pages["before"]
    assert 'id="interventions"' not in before and "The model itself" not in before
    assert "Does the model use" not in before and 'href="#interventions"' not in before
    # Taking them away again gives back the very same bytes.
    directory = Path(pages["directory"])
    copy = tmp_path / "run"
    shutil.copytree(directory, copy)
    remove_interventions(copy)
    page = write_report(copy, top=2, examples=1).read_text(encoding="utf-8")
    assert page.replace(str(copy), str(directory)) == before
    # The behaviour alone: the opening item, without a link to a section that is not there.
    record = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**record, "behavior": BEHAVIOR}))
    page = write_report(copy, top=2, examples=1).read_text(encoding="utf-8")
    assert "The model itself" in page and 'href="#interventions"' not in page


def test_a_damaged_interventions_table_is_named(pages: dict[str, str], tmp_path: Path) -> None:
    from neuronprobe.errors import NeuronprobeError

    copy = tmp_path / "run"
    shutil.copytree(Path(pages["directory"]), copy)
    interventions_table().drop(columns=["auc_after"]).to_parquet(copy / "interventions.parquet")
    with pytest.raises(NeuronprobeError, match="interventions.parquet .*no column 'auc_after'"):
        write_report(copy)


def test_intervention_effects_against_a_hand_computation() -> None:
    effects = intervention_effects(interventions_table(), layers=LAYERS, k_labels=["10", "all"])
    assert list(zip(effects["k_label"], effects["layer"], strict=True)) == [
        ("10", 1), ("10", 3), ("10", -1), ("all", 1), ("all", 3), ("all", -1),
    ]  # fmt: skip
    one = effects.iloc[0]
    draws = np.array([0.01, 0.02, 0.03, 0.00, 0.04])
    sd = math.sqrt(((draws - 0.02) ** 2).sum() / 4)  # 0.0158
    assert one["top_effect"] == pytest.approx(0.06)
    assert one["random_mean"] == pytest.approx(0.02)
    assert one["random_sd"] == pytest.approx(sd)
    assert (one["random_min"], one["random_max"]) == pytest.approx((0.0, 0.04))
    assert one["z"] == pytest.approx(0.04 / sd)
    assert (one["rank"], one["draws"], one["k"]) == (1, 5, 10)
    assert one["verdict"] == "more than random"
    assert one["delta_logodds_positive"] == pytest.approx(-0.06)
    three = effects.iloc[1]
    assert three["rank"] == 4  # 0.02, 0.03, 0.04 are at least 0.02: three draws above it
    assert three["z"] == pytest.approx(0.0, abs=1e-12)
    assert three["verdict"] == "no more than random neurons"
    missing = effects.iloc[4]
    assert missing["verdict"] == "no significant neuron"
    assert pd.isna(missing["rank"]) and pd.isna(missing["k"]) and missing["draws"] == 0
    assert math.isnan(missing["top_effect"]) and math.isnan(missing["z"])
    whole = effects.iloc[5]
    assert whole["k"] == 41 and whole["top_effect"] == pytest.approx(0.20)
    assert whole["random_sd"] == pytest.approx(math.sqrt(0.0002 / 4))


def test_intervention_effects_edge_cases() -> None:
    table = interventions_table()
    layer = table[(table["layer"] == 1) & (table["k_label"] == "10")]
    # Draws that all agree (sd 0), one draw, no draw: z is NaN; a tie with the top ranks above.
    tied = layer.assign(delta_logodds_positive=-0.06)
    effects = intervention_effects(tied)
    assert math.isnan(effects["z"].iloc[0]) and effects["random_sd"].iloc[0] == 0
    assert (
        effects["rank"].iloc[0] == 6 and effects["verdict"].iloc[0] == "no more than random neurons"
    )
    one_draw = intervention_effects(layer[layer["draw"] <= 1])
    assert one_draw["draws"].iloc[0] == 1 and math.isnan(one_draw["random_sd"].iloc[0])
    assert math.isnan(one_draw["z"].iloc[0]) and one_draw["rank"].iloc[0] == 1
    alone = intervention_effects(layer[layer["selection"] == "top"])
    assert alone["verdict"].iloc[0] == "no random draws" and math.isnan(alone["random_mean"][0])
    # Without `layers`, only the layers of the table.
    assert list(intervention_effects(table)["layer"]) == [1, 3, -1, 1, -1]
    with pytest.raises(ValueError, match="no column 'auc_after'"):
        intervention_effects(table.drop(columns=["auc_after"]))
    with pytest.raises(ValueError, match="2 top rows"):
        intervention_effects(pd.concat([layer, layer[layer["selection"] == "top"]]))


def test_the_figure_marks_the_strongest_neurons_against_the_draws() -> None:
    table = interventions_table()
    figure = interventions_figure(table, positive="can't", negative="can")
    assert isinstance(figure, Figure)
    ten, everything = figure.axes
    # One diamond per layer with a top row: layers 1, 3 and the whole model for k = 10; for
    # k = all layer 3 has none.
    for ax, tops, draws in ((ten, 3, 15), (everything, 2, 10)):
        (top,) = [line for line in ax.get_lines() if line.get_gid() == "top"]
        (drawn,) = [line for line in ax.get_lines() if line.get_gid() == "random"]
        assert len(top.get_xdata()) == tops and len(drawn.get_xdata()) == draws
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "3", "all layers"]
        assert "Log-odds gap narrowed" in ax.get_ylabel()
        assert any(tuple(line.get_ydata()) == (0, 0) for line in ax.get_lines())  # zero line
    top = next(line for line in ten.get_lines() if line.get_gid() == "top")
    np.testing.assert_allclose(top.get_ydata(), [0.06, 0.02, 0.15])
    assert "Mean ablation" in figure.texts[0].get_text()
    assert "5 random draws from the same layer" in figure.texts[0].get_text()
    with pytest.raises(ValueError, match="no column 'selection'"):
        interventions_figure(table.drop(columns=["selection"]), positive="a", negative="b")
