"""Stage 5a: the neuron table's significance decision and the laminar profile, against numpy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neuronprobe.statistics import fit_neuron_logits
from neuronprobe.tables import layer_table, neuron_table


def fits_on_synthetic_layers() -> tuple[object, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.repeat([False, True], 150)
    effect = np.concatenate([np.zeros(20), np.linspace(0.2, 2.0, 20)])  # [neurons]
    sign = np.where(np.arange(40) % 2 == 0, 1.0, -1.0)
    activations = (
        rng.normal(size=(3, 300, 40)) + labels[None, :, None] * (effect * sign)[None, None, :]
    )
    return fit_neuron_logits(activations, labels, seed=0), activations


def test_neuron_table_applies_bonferroni_per_layer() -> None:
    fits, _ = fits_on_synthetic_layers()
    table = neuron_table(fits, layers=[2, 5, 7], significance=0.05)
    assert len(table) == 3 * 40
    assert table["layer"].unique().tolist() == [2, 5, 7]
    assert (table["pvalue_threshold"] == 0.05 / 40).all()
    expected = np.nan_to_num(fits.pvalue.ravel(), nan=1.0) < 0.05 / 40
    np.testing.assert_array_equal(table["significant"].to_numpy(), expected)
    assert expected.sum() > 10  # the strong effects are found
    assert not table.loc[table["beta"] == 0, "significant"].any()
    np.testing.assert_array_equal(
        table["direction"].to_numpy(),
        np.where(
            fits.beta.ravel() > 0, "positive", np.where(fits.beta.ravel() < 0, "negative", "zero")
        ),
    )


def test_layer_table_is_the_notebooks_part_4() -> None:
    fits, _ = fits_on_synthetic_layers()
    neurons = neuron_table(fits, layers=[0, 1, 2])
    layers = layer_table(neurons)
    # The notebook's masks, computed directly from the [layers, neurons] arrays.
    pvalues = np.where(np.isnan(fits.pvalue), 1.0, fits.pvalue)
    pvalue_mask = pvalues < 0.05 / 40
    np.testing.assert_allclose(layers["percent_significant"], 100 * pvalue_mask.mean(axis=1))
    for split, accuracy in (("train", fits.train_acc), ("test", fits.test_acc)):
        for name, sign_mask in (("positive", fits.beta > 0), ("negative", fits.beta < 0)):
            masked = np.where(pvalue_mask & sign_mask, accuracy, np.nan)
            with np.errstate(all="ignore"):
                expected = np.array(
                    [np.nanmean(row) if np.isfinite(row).any() else np.nan for row in masked]
                )
            np.testing.assert_allclose(layers[f"{split}_acc_{name}"], expected)
    assert layers["neurons"].tolist() == [40, 40, 40]
    assert isinstance(layers, pd.DataFrame)


@pytest.mark.parametrize("correction", ["bonferroni-layer", "bonferroni", "fdr-bh"])
def test_significant_is_decided_by_one_pair_of_columns_on_each_scale(correction: str) -> None:
    """Raw p against pvalue_threshold, or pvalue_adj against the significance level: the same
    decision. pvalue_adj against pvalue_threshold (different scales) is not."""
    fits, _ = fits_on_synthetic_layers()
    table = neuron_table(fits, layers=[2, 5, 7], significance=0.05, correction=correction)
    raw = table["pvalue"].fillna(1.0)
    at_most = correction == "fdr-bh"  # BH's cut-off passes; Bonferroni is strict, as the notebook
    by_raw = raw <= table["pvalue_threshold"] if at_most else raw < table["pvalue_threshold"]
    by_adjusted = table["pvalue_adj"] <= 0.05 if at_most else table["pvalue_adj"] < 0.05
    np.testing.assert_array_equal(table["significant"], by_raw & table["pvalue"].notna())
    np.testing.assert_array_equal(table["significant"], by_adjusted & table["pvalue"].notna())
    mixed = table["pvalue_adj"] < table["pvalue_threshold"]
    assert (mixed != table["significant"]).any()  # the comparison the names warn against
