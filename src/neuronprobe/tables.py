"""Stage 5a, tables: the per-neuron table and the laminar (per-layer) profile.

Entry points: :func:`neuron_table` (fits -> one row per layer and neuron, with the
multiple-comparison decision) and :func:`layer_table` (neuron table -> one row per layer, the
notebook's part 4, plus the shuffled-label control where the fits have it). :func:`top_neurons`
is the one order of "strongest" neurons that the interventions and the report share.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from neuronprobe.statistics import NeuronFits, adjust_pvalues


def neuron_table(
    fits: NeuronFits,
    layers: Sequence[int],
    significance: float = 0.05,
    correction: str = "bonferroni-layer",
    test: str = "wald",
) -> pd.DataFrame:
    """One row per (layer, neuron) with the significance decision.

    Parameters
    ----------
    fits:
        Per-neuron fits shaped [layers, neurons].
    layers:
        The model layer of each row of ``fits`` (``fits.beta[i]`` is layer ``layers[i]``).
    significance:
        Error rate of the correction (0.05 in the notebook).
    correction:
        ``bonferroni-layer`` (the notebook's ``significance / neurons per layer``),
        ``bonferroni`` (over all recorded neurons) or ``fdr-bh`` (Benjamini-Hochberg over all
        recorded neurons); see :func:`neuronprobe.statistics.adjust_pvalues`.
    test:
        ``wald`` (the notebook's ``pvalue``) or ``lr`` (``pvalue_lr``) decides significance.

    Returns
    -------
    pandas.DataFrame
        Columns ``layer, neuron, beta, intercept, beta_se, pvalue, pvalue_lr, pvalue_adj,
        pvalue_threshold, significant, direction, auc, train_acc, test_acc, [cv_acc],
        separated, converged, constant, [pvalue_shuffled, pvalue_lr_shuffled,
        significant_shuffled]``. Two scales, two pairs to compare:

        - ``significant`` is decided on the raw scale: the deciding raw p-value (``pvalue``
          for ``test="wald"``, ``pvalue_lr`` for ``"lr"``) below the layer's
          ``pvalue_threshold`` (Bonferroni, strictly, as the notebook) or at or below it
          (Benjamini-Hochberg's cut-off); never where the p-value is NaN.
        - ``pvalue_adj`` is that p-value after the correction, on the scale of
          ``significance``: compare it with ``significance`` (0.05), never with
          ``pvalue_threshold``.

        ``direction`` is ``positive`` (beta > 0: higher activation -> positive class),
        ``negative`` or ``zero``; ``significant_shuffled`` applies the same decision to the
        shuffled-label control.
    """
    if fits.beta.ndim != 2 or fits.beta.shape[0] != len(layers):
        raise ValueError(
            f"fits must be [layers, neurons] with {len(layers)} layers, got {fits.beta.shape}"
        )
    table = fits.to_frame()
    table["layer"] = np.asarray(layers, dtype=np.int64)[table["layer"].to_numpy()]
    raw = fits.pvalue if test == "wald" else fits.pvalue_lr
    adjusted, threshold = adjust_pvalues(raw, correction, significance)
    significant = _decide(raw, threshold, correction)
    at = table.columns.get_loc("pvalue_lr") + 1
    table.insert(at, "pvalue_adj", adjusted.ravel())
    table.insert(at + 1, "pvalue_threshold", np.repeat(threshold, fits.beta.shape[1]))
    table.insert(at + 2, "significant", significant.ravel())
    direction = np.select(
        [table["beta"] > 0, table["beta"] < 0], ["positive", "negative"], default="zero"
    )
    table.insert(at + 3, "direction", direction)
    if "pvalue_shuffled" in table.columns:
        control = fits.pvalue_shuffled if test == "wald" else fits.pvalue_lr_shuffled
        _, control_threshold = adjust_pvalues(control, correction, significance)
        table["significant_shuffled"] = _decide(control, control_threshold, correction).ravel()
    return table


def _decide(pvalues: np.ndarray, threshold: np.ndarray, correction: str) -> np.ndarray:
    """Significance per neuron ``[layers, neurons]``: the notebook's ``p < threshold`` for
    Bonferroni, Benjamini-Hochberg's ``p <= cut-off``; never for a NaN p-value."""
    limit = threshold[:, None]
    with np.errstate(invalid="ignore"):
        passed = pvalues <= limit if correction == "fdr-bh" else pvalues < limit
    return np.asarray(passed & ~np.isnan(pvalues))


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
        test_acc_positive, test_acc_negative, auc_significant`` (accuracies and AUC are means
        over the significant neurons with positive / negative betas, or all significant
        neurons, NaN where there are none: the notebook's part 4B), plus
        ``significant_shuffled, percent_significant_shuffled`` (the shuffled-label control:
        how many pass by chance) where the table has the control.
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
        if "auc" in group.columns:
            auc = group["auc"].to_numpy()
            row["auc_significant"] = float(auc[significant].mean()) if significant.any() else np.nan
        if "significant_shuffled" in group.columns:
            shuffled = group["significant_shuffled"].to_numpy()
            row["significant_shuffled"] = int(shuffled.sum())
            row["percent_significant_shuffled"] = 100.0 * shuffled.mean()
        rows.append(row)
    return pd.DataFrame(rows)


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
