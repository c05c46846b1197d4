"""Stage 5a, tables: the per-neuron table and the laminar (per-layer) profile.

Entry points: :func:`neuron_table` (fits -> one row per layer and neuron, with the
Bonferroni decision) and :func:`layer_table` (neuron table -> one row per layer, the notebook's
part 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from neuronprobe.statistics import NeuronFits


def neuron_table(
    fits: NeuronFits, layers: Sequence[int], significance: float = 0.05
) -> pd.DataFrame:
    """One row per (layer, neuron) with the significance decision.

    Parameters
    ----------
    fits:
        Per-neuron fits shaped [layers, neurons].
    layers:
        The model layer of each row of ``fits`` (``fits.beta[i]`` is layer ``layers[i]``).
    significance:
        Family-wise error rate per layer; ``threshold = significance / neurons per layer``
        (the notebook's Bonferroni correction, ``.05 / 4096`` for gpt2-medium).

    Returns
    -------
    pandas.DataFrame
        Columns ``layer, neuron, beta, intercept, beta_se, pvalue, threshold, significant,
        direction, train_acc, test_acc, converged, constant``; ``significant`` is
        ``pvalue < threshold`` (False where the slope is 0 and p is NaN); ``direction`` is
        ``positive`` (beta > 0: higher activation -> positive class), ``negative`` or ``zero``.
    """
    if fits.beta.ndim != 2 or fits.beta.shape[0] != len(layers):
        raise ValueError(
            f"fits must be [layers, neurons] with {len(layers)} layers, got {fits.beta.shape}"
        )
    table = fits.to_frame()
    table["layer"] = np.asarray(layers, dtype=np.int64)[table["layer"].to_numpy()]
    n_neurons = fits.beta.shape[1]
    threshold = significance / n_neurons
    table.insert(table.columns.get_loc("pvalue") + 1, "threshold", threshold)
    significant = (table["pvalue"] < threshold).fillna(False).astype(bool)
    table.insert(table.columns.get_loc("threshold") + 1, "significant", significant)
    direction = np.select(
        [table["beta"] > 0, table["beta"] < 0], ["positive", "negative"], default="zero"
    )
    table.insert(table.columns.get_loc("significant") + 1, "direction", direction)
    return table


def layer_table(neurons: pd.DataFrame) -> pd.DataFrame:
    """The laminar profile: per layer, how many neurons are significant and how well they predict.

    Parameters
    ----------
    neurons:
        A table from :func:`neuron_table`.

    Returns
    -------
    pandas.DataFrame
        One row per layer: ``layer, neurons, significant, percent_significant,
        significant_positive, significant_negative, train_acc_positive, train_acc_negative,
        test_acc_positive, test_acc_negative`` (accuracies are means over the significant
        neurons with positive / negative betas, NaN where there are none: the notebook's
        part 4B).
    """
    rows = []
    for layer, group in neurons.groupby("layer", sort=True):
        significant = group["significant"].to_numpy()
        positive = significant & (group["beta"].to_numpy() > 0)
        negative = significant & (group["beta"].to_numpy() < 0)
        row: dict[str, float | int] = {
            "layer": int(layer),
            "neurons": len(group),
            "significant": int(significant.sum()),
            "percent_significant": 100.0 * significant.mean(),
            "significant_positive": int(positive.sum()),
            "significant_negative": int(negative.sum()),
        }
        for split in ("train", "test"):
            accuracy = group[f"{split}_acc"].to_numpy()
            for name, mask in (("positive", positive), ("negative", negative)):
                row[f"{split}_acc_{name}"] = float(accuracy[mask].mean()) if mask.any() else np.nan
        rows.append(row)
    return pd.DataFrame(rows)
