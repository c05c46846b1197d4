"""Stage 5b: the notebook's figures show what the tables say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neuronprobe.figures import accuracy_figure, layers_figure, neuron_figure, save_figure
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
