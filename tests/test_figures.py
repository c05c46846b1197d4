"""Stage 5b: the notebook's figures show what the tables say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neuronprobe.decoding import decode_layers
from neuronprobe.figures import (
    accuracy_figure,
    decoding_figure,
    layers_figure,
    neuron_figure,
    save_figure,
)
from neuronprobe.tables import layer_table


def synthetic_table() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    n = 50
    rows = []
    for layer in range(3):
        beta = rng.normal(size=n)
        beta[:5] = 0.0
        pvalue = np.where(beta == 0, np.nan, rng.uniform(0, 1, n) ** 4)
        rows.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "neuron": np.arange(n),
                    "beta": beta,
                    "pvalue": pvalue,
                    "pvalue_threshold": 0.05 / n,
                    "significant": np.nan_to_num(pvalue, nan=1) < 0.05 / n,
                    "train_acc": rng.uniform(40, 90, n),
                    "test_acc": rng.uniform(40, 90, n),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def test_neuron_figure_has_the_four_panels_and_the_right_points() -> None:
    table = synthetic_table()
    figure = neuron_figure(table, layer=1)
    ax0, ax1, _, ax3 = figure.axes
    rows = table[table["layer"] == 1]
    positive_sig = ((rows["beta"] > 0) & rows["significant"]).sum()
    lines = {line.get_label(): line for line in ax0.get_lines()}
    assert len(lines["Positive and sig."].get_xdata()) == positive_sig
    plotted = sum(len(line.get_xdata()) for line in ax0.get_lines())
    assert plotted == (rows["beta"] != 0).sum()  # zero slopes are neither positive nor negative
    threshold_line = ax1.get_lines()[-1]
    assert threshold_line.get_ydata()[0] == pytest.approx(-np.log10(0.05 / 50))
    assert ax3.get_title() == "D) TEST accuracy by p-values"
    assert "layer 1" in ax0.get_title()


def test_accuracy_and_layer_figures(tmp_path: Path) -> None:
    table = synthetic_table()
    figure = accuracy_figure(table, layer=0)
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["TRAIN", "TEST", "Chance"]
    layers = layer_table(table)
    profile = layers_figure(layers)
    percent = profile.axes[0].get_lines()[0].get_ydata()
    np.testing.assert_allclose(percent, layers["percent_significant"])
    written = save_figure(profile, tmp_path / "figures" / "layers")
    assert [p.name for p in written] == ["layers.png", "layers.svg"]
    from matplotlib.image import imread

    assert imread(written[0]).shape[:2] == (1050, 3600)  # 12 x 3.5 inches at 300 dpi
    assert not list((tmp_path / "figures").glob(".*"))  # no temporary files left behind


def test_unknown_layer_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"layer 9 is not in the neuron table"):
        neuron_figure(synthetic_table(), layer=9)


def planted_decoding() -> pd.DataFrame:
    """The real :func:`decode_layers` on a small array with a planted signal: layers 2, 5, 7
    of 60 contexts by 30 neurons, the first 3 neurons of layer 5 shifted for one class."""
    rng = np.random.default_rng(4)
    labels = np.arange(60) % 2 == 0
    activations = rng.normal(size=(3, 60, 30))
    activations[1, labels, :3] += 1.5
    return decode_layers(activations, labels, k=(1, 5, None), cv=3, layers=[2, 5, 7])


def test_decoding_figure_draws_the_tables_aucs(tmp_path: Path) -> None:
    table = planted_decoding()
    figure = decoding_figure(table, model_auc=0.734)
    (ax,) = figure.axes
    lines = {line.get_gid(): line for line in ax.get_lines()}
    # One line per k, in the table's order of k, each with the table's cv_auc by layer.
    for label in ("1", "5", "all"):
        rows = table[table["k"] == label].sort_values("layer")
        np.testing.assert_array_equal(lines[f"k={label}"].get_xdata(), rows["layer"])
        np.testing.assert_allclose(lines[f"k={label}"].get_ydata(), rows["cv_auc"])
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[:3] == ["k = 1", "k = 5", "whole layer"]
    # A sequential colour map: no two k share a colour.
    assert len({tuple(lines[f"k={k}"].get_color()) for k in ("1", "5", "all")}) == 3
    # The shuffled-label band spans, per layer, the lowest to the highest shuffled AUC.
    (band,) = [c for c in ax.collections if c.get_gid() == "shuffled"]
    vertices = band.get_paths()[0].vertices
    spans = table.groupby("layer")["shuffled_auc"].agg(["min", "max"])
    for layer, (low, high) in spans.iterrows():
        at = vertices[np.isclose(vertices[:, 0], layer)][:, 1]
        np.testing.assert_allclose([at.min(), at.max()], [low, high])
    assert "shuffled labels" in band.get_label()
    # The model's own answer, dashed, and chance, dotted.
    assert tuple(lines["model"].get_ydata()) == (0.734, 0.734)
    assert lines["model"].get_linestyle() == "--"
    assert lines["model"].get_label() == "model's own answer (AUC 0.73)"
    assert tuple(lines["chance"].get_ydata()) == (0.5, 0.5)
    assert lines["chance"].get_linestyle() == ":"
    assert ax.get_ylabel() == "cross-validated AUC"
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert "model's own answer (AUC 0.73)" in legend and "whole layer" in legend
    written = save_figure(figure, tmp_path / "decoding")
    assert [p.name for p in written] == ["decoding.png", "decoding.svg"]


def test_decoding_figure_without_the_model_or_the_control() -> None:
    table = planted_decoding()
    figure = decoding_figure(table, model_auc=None)
    gids = {line.get_gid() for line in figure.axes[0].get_lines()}
    assert "model" not in gids and "chance" in gids
    # Without the shuffled-label control there is no band; one layer still shows its points.
    alone = table[table["layer"] == 5].assign(shuffled_auc=np.nan)
    ax = decoding_figure(alone, model_auc=0.6).axes[0]
    assert not [c for c in ax.collections if c.get_gid() == "shuffled"]
    assert len(ax.get_lines()) == 3 + 2  # three k, the model, chance
    with pytest.raises(ValueError, match="no column 'cv_auc'"):
        decoding_figure(table.drop(columns=["cv_auc"]), model_auc=None)
    with pytest.raises(ValueError, match="no rows"):
        decoding_figure(table.iloc[:0], model_auc=None)
