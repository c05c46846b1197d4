"""Stage 5b, figures: the notebook's three figures, panel for panel.

Entry points, each returning a matplotlib ``Figure``:

- :func:`neuron_figure`: part 3a, betas by neuron and p-values against betas, train and test
  accuracy, for one layer;
- :func:`accuracy_figure`: part 3b, distributions of train and test accuracy for one layer;
- :func:`layers_figure`: part 4, the laminar profile;
- :func:`interventions_figure`: the drop of the model's own AUC when the strongest neurons are
  changed, against random neurons of the same layer;
- :func:`decoding_figure`: how much each layer knows, the cross-validated AUC of probes on its
  ``k`` strongest neurons, against the shuffled-label control and the model's own answer.

:func:`save_figure` writes PNG (300 dpi, as the notebook's ``savefig.dpi``) and SVG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from neuronprobe.config import decode_k_order
from neuronprobe.rundir import atomic_path

# The notebook's rcParams (light mode).
STYLE: dict[str, Any] = {
    "axes.spines.right": False,
    "axes.spines.top": False,
    "axes.titleweight": "bold",
    "axes.labelweight": "bold",
    "savefig.dpi": 300,
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or assumed
    import matplotlib.pyplot as plt

    return plt


def _layer_rows(neurons: pd.DataFrame, layer: int) -> pd.DataFrame:
    rows = neurons[neurons["layer"] == layer].sort_values("neuron")
    if rows.empty:
        raise ValueError(
            f"layer {layer} is not in the neuron table (layers: {sorted(neurons['layer'].unique())})"
        )
    return rows


def neuron_figure(
    neurons: pd.DataFrame, layer: int, contrast_name: str = "can", pvalue: str = "pvalue"
) -> Figure:
    """The notebook's part 3a figure for one layer.

    Panels: (A) beta of every neuron by index; (B) -log10(p) against beta; (C) against train
    accuracy; (D) against test accuracy. Red = positive beta, green = negative; circles are
    significant (p below the layer's threshold), crosses are not.  ``pvalue`` names the column
    plotted: ``pvalue`` (Wald, the notebook's) or ``pvalue_lr``.
    """
    plt = _pyplot()
    from matplotlib.gridspec import GridSpec

    rows = _layer_rows(neurons, layer)
    index = rows["neuron"].to_numpy()
    beta = rows["beta"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = -np.log10(rows[pvalue].to_numpy())
    train = rows["train_acc"].to_numpy()
    test = rows["test_acc"].to_numpy()
    threshold = float(rows["pvalue_threshold"].iloc[0])
    significant = rows["significant"].to_numpy()
    n_neurons = len(rows)

    with plt.rc_context(STYLE):
        fig = plt.figure(figsize=(11, 7))
        grid = GridSpec(2, 3, figure=fig)
        ax0 = fig.add_subplot(grid[0, :])
        ax1 = fig.add_subplot(grid[1, 0])
        ax2 = fig.add_subplot(grid[1, 1])
        ax3 = fig.add_subplot(grid[1, 2])

        groups = [
            (beta > 0, True, "ro", "Positive and sig."),
            (beta > 0, False, "rx", "Positive and non-sig."),
            (beta < 0, True, "go", "Negative and sig."),
            (beta < 0, False, "gx", "Negative and non-sig."),
        ]
        for sign_mask, is_sig, marker, label in groups:
            mask = sign_mask & (significant if is_sig else ~significant)
            if is_sig:
                ax0.plot(
                    index[mask], beta[mask], marker, markerfacecolor=[0.7, 0.7, 0.7], label=label
                )
                style: dict[str, Any] = {"markerfacecolor": [0.7, 0.7, 0.7, 0.5]}
            else:
                ax0.plot(index[mask], beta[mask], marker, markersize=3, label=label)
                style = {"markersize": 3}
            ax1.plot(beta[mask], logp[mask], marker, **style)
            ax2.plot(train[mask], logp[mask], marker, **style)
            ax3.plot(test[mask], logp[mask], marker, **style)

        ax0.set(
            ylabel="Beta coefficient",
            xlabel="Neuron index",
            xlim=[-10, n_neurons + 9],
            title=f'A) Statistical parameters of "{contrast_name}" classification (layer {layer})',
        )
        ax0.legend(fontsize=8)
        # A BH cut-off of 0 means no neuron passes: there is no line to draw.
        for ax in (ax1, ax2, ax3) if threshold > 0 else ():
            ax.axhline(
                -np.log10(threshold), linestyle="--", color="b", label="Significance threshold"
            )
        for ax in (ax2, ax3):
            ax.axvline(50, linestyle="--", color="k", linewidth=0.5, label="Chance")
        ax2.legend(fontsize=8)
        ax1.set(xlabel="Beta coeff", ylabel="$-log_{10}(p)$", title="B) Betas by p-values")
        ax2.set(
            xlabel="Prediction accuracy (%)",
            ylabel="$-log_{10}(p)$",
            title="C) TRAIN accuracy by p-values",
        )
        ax3.set(
            xlabel="Prediction accuracy (%)",
            ylabel="$-log_{10}(p)$",
            title="D) TEST accuracy by p-values",
        )
        if threshold > 0:  # otherwise panel B has nothing labelled to explain
            ax1.legend(fontsize=8)
        fig.tight_layout()
    return fig


def accuracy_figure(neurons: pd.DataFrame, layer: int) -> Figure:
    """The notebook's part 3b figure: densities of train and test accuracy over one layer's neurons."""
    plt = _pyplot()
    rows = _layer_rows(neurons, layer)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(8, 3))
        for column, label in (("train_acc", "TRAIN"), ("test_acc", "TEST")):
            density, edges = np.histogram(rows[column].to_numpy(), bins="fd", density=True)
            ax.plot(edges[:-1], density, linewidth=2, label=label)
        ax.axvline(50, linestyle="--", color="k", linewidth=0.5, label="Chance")
        ax.set(
            xlabel="Prediction accuracy (%)",
            ylabel="Density",
            title=f"Distribution of prediction accuracies (layer {layer})",
        )
        ax.legend()
        fig.tight_layout()
    return fig


def layers_figure(layers: pd.DataFrame) -> Figure:
    """The notebook's part 4 figure: (A) percent significant neurons per layer; (B) mean train
    and test accuracy of the significant neurons with positive and negative betas.

    Where the table has the shuffled-label control, panel A also shows the percent of neurons
    that pass the same threshold with permuted labels (chance), as a grey line.
    """
    plt = _pyplot()
    x = layers["layer"].to_numpy()
    with plt.rc_context(STYLE):
        fig, axs = plt.subplots(1, 2, figsize=(12, 3.5))
        axs[0].plot(
            x, layers["percent_significant"], "kH", markerfacecolor=[0.9, 0.7, 0.9], markersize=12
        )
        if "percent_significant_shuffled" in layers.columns:
            axs[0].plot(
                x,
                layers["percent_significant_shuffled"],
                "x-",
                color=[0.5, 0.5, 0.5],
                markersize=5,
                label="Shuffled labels (chance)",
            )
            axs[0].legend(fontsize=8)
        axs[0].set(
            xlabel="Layer",
            ylabel="Percent significant neurons (%)",
            title="A) Laminar profile of significance",
        )
        axs[1].plot(
            x,
            layers["train_acc_positive"],
            "gs",
            markerfacecolor=[0.7, 0.9, 0.7],
            markersize=10,
            label="TRAIN $\\beta$s>0",
        )
        axs[1].plot(
            x,
            layers["train_acc_negative"],
            "b^",
            markerfacecolor=[0.7, 0.7, 0.9],
            markersize=10,
            label="TRAIN $\\beta$s<0",
        )
        axs[1].plot(
            x,
            layers["test_acc_positive"],
            "gs-",
            markerfacecolor=[0.7, 0.9, 0.7],
            markersize=5,
            zorder=-10,
            label="TEST $\\beta$s>0",
        )
        axs[1].plot(
            x,
            layers["test_acc_negative"],
            "b^-",
            markerfacecolor=[0.7, 0.7, 0.9],
            markersize=5,
            zorder=-10,
            label="TEST $\\beta$s<0",
        )
        axs[1].legend()
        axs[1].set(
            xlabel="Layer",
            ylabel="Prediction accuracy (%)",
            title="B) Average prediction accuracies in significant neurons",
        )
        fig.tight_layout()
    return fig


def save_figure(
    figure: Figure, path: Path, formats: tuple[str, ...] = ("png", "svg")
) -> list[Path]:
    """Write ``figure`` as ``path.<format>`` for each format (atomically); return the paths."""
    written = []
    for extension in formats:
        target = Path(path).with_suffix(f".{extension}")
        with atomic_path(target) as temporary:
            figure.savefig(temporary, format=extension, dpi=STYLE["savefig.dpi"])
        written.append(target)
    return written


def control_figure(layers: pd.DataFrame) -> Figure:
    """The shuffled-label control per layer: percent significant with real and shuffled labels.

    Two bars per layer: the percent of its neurons that pass the correction with the real labels
    (purple) and with permuted training labels (grey, outlined so that a zero still shows). With
    a working correction the grey bars stay near zero; the title gives both totals.

    Parameters
    ----------
    layers:
        A table from :func:`neuronprobe.tables.layer_table` of a run with the shuffled-label
        control (columns ``percent_significant_shuffled`` and ``significant_shuffled``).

    Raises
    ------
    ValueError
        If the table has no shuffled-label control.
    """
    missing = {"percent_significant_shuffled", "significant_shuffled"} - set(layers.columns)
    if missing:
        raise ValueError(
            "the layer table has no shuffled-label control (run with --shuffled-control)"
        )
    plt = _pyplot()
    x = np.arange(len(layers))
    real = layers["percent_significant"].to_numpy(dtype=float)
    shuffled = layers["percent_significant_shuffled"].to_numpy(dtype=float)
    total = int(layers["neurons"].sum())
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(12, 3.5))
        width = 0.4
        ax.bar(
            x - width / 2,
            real,
            width,
            color=[0.9, 0.7, 0.9],
            edgecolor="k",
            linewidth=0.5,
            label="Real labels",
        )
        ax.bar(
            x + width / 2,
            shuffled,
            width,
            color=[0.6, 0.6, 0.6],
            edgecolor=[0.3, 0.3, 0.3],
            linewidth=0.8,
            label="Shuffled labels (chance)",
        )
        ax.set_xticks(x, [str(layer) for layer in layers["layer"]])
        ax.set(
            xlabel="Layer",
            ylabel="Percent significant neurons (%)",
            title=(
                f"Control: {int(layers['significant'].sum()):,} of {total:,} neurons pass with "
                f"real labels, {int(layers['significant_shuffled'].sum()):,} with shuffled labels"
            ),
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
    return fig


#: The columns :func:`interventions_figure` reads from an interventions table.
_INTERVENTION_COLUMNS = (
    "layer",
    "k_label",
    "selection",
    "draw",
    "ablation",
    "delta_logodds_positive",
    "delta_logodds_negative",
)


def interventions_figure(interventions: pd.DataFrame, *, positive: str, negative: str) -> Figure:
    """Does the model use the significant neurons? How much changing them narrows the gap
    between the model's own log-odds in the two classes, against the same change to random
    neurons of the same layer.

    One panel per ``k_label`` (``"10"``, ``"all"``...), in the table's order; per layer (x
    axis, the whole model, layer -1, as a separate point "all layers" at the right): the effect
    of changing the top-k neurons as a purple diamond, the random draws as grey points over a
    grey band from their smallest to their largest effect. Effect = ``delta_logodds_negative -
    delta_logodds_positive`` (above the zero line: the model's answer differs less between the
    classes after the change; see :func:`neuronprobe.report.intervention_effects`). A layer
    without a top row (no significant neuron) has no diamond.

    Parameters
    ----------
    interventions:
        The run's ``interventions.parquet``: one row per intervention, with the columns
        ``layer, k_label, selection ("top"|"random"), draw, ablation, delta_logodds_positive,
        delta_logodds_negative``.
    positive, negative:
        The two classes' names, for the axis label.

    Returns
    -------
    matplotlib.figure.Figure
        The top-k diamonds of each panel are one line with ``gid="top"``; the random draws one
        with ``gid="random"``.

    Raises
    ------
    ValueError
        If a column is missing.
    """
    missing = [c for c in _INTERVENTION_COLUMNS if c not in interventions.columns]
    if missing:
        raise ValueError(f"the interventions table has no column {missing[0]!r}")
    plt = _pyplot()
    table = interventions.assign(
        effect=interventions["delta_logodds_negative"].astype(float)
        - interventions["delta_logodds_positive"].astype(float)
    )
    labels = list(dict.fromkeys(str(label) for label in table["k_label"])) or ["all"]
    layers = sorted(int(layer) for layer in table["layer"].unique() if int(layer) != -1)
    positions = {layer: float(i) for i, layer in enumerate(layers)}
    ticks = [str(layer) for layer in layers]
    if (table["layer"] == -1).any():
        positions[-1] = len(layers) + 0.5  # apart from the layers: it is not one of them
        ticks.append("all layers")
    random = table[table["selection"] == "random"]
    draws = int(random.groupby(["layer", "k_label"]).size().max()) if len(random) else 0
    ablations = "/".join(dict.fromkeys(str(a) for a in table["ablation"])) or "no"
    with plt.rc_context(STYLE):
        fig, axs = plt.subplots(
            len(labels), 1, figsize=(max(9.0, 0.35 * len(positions) + 4), 3.2 * len(labels)),
            squeeze=False,
        )  # fmt: skip
        for ax, label in zip(axs[:, 0], labels, strict=True):
            rows = table[table["k_label"].astype(str) == label]
            ax.axhline(0, color="k", linewidth=0.6)
            if -1 in positions and len(layers):
                ax.axvline(len(layers) - 0.25, color=[0.8, 0.8, 0.8], linestyle=":", linewidth=1)
            drawn = rows[rows["selection"] == "random"]
            spans = drawn.groupby("layer")["effect"].agg(["min", "max"])
            x_band = [positions[int(layer)] for layer in spans.index]
            band = ax.bar(
                x_band,
                (spans["max"] - spans["min"]).to_numpy(),
                width=0.5,
                bottom=spans["min"].to_numpy(),
                color=[0.85, 0.85, 0.85],
                edgecolor=[0.6, 0.6, 0.6],
                linewidth=0.5,
                label="range of the random draws",
            )
            for patch in band:  # a band's ends are data, not where the axis must stop
                patch.sticky_edges.y.clear()
            ax.plot(
                [positions[int(layer)] for layer in drawn["layer"]],
                drawn["effect"].to_numpy(),
                "o",
                color=[0.45, 0.45, 0.45],
                markersize=3,
                gid="random",
                label="random neurons, same layer",
            )
            top = rows[rows["selection"] == "top"]
            top = top.iloc[np.argsort([positions[int(x)] for x in top["layer"]], kind="stable")]
            ax.plot(
                [positions[int(layer)] for layer in top["layer"]],
                top["effect"].to_numpy(),
                "D",
                color="#6b2c91",
                markersize=7,
                gid="top",
                label="strongest significant neurons",
            )
            what = (
                "All significant neurons of each layer changed"
                if label == "all"
                else f"The {label} strongest significant neurons of each layer changed "
                "(all, where fewer)"
            )
            ax.set_xticks(list(positions.values()), ticks, fontsize=8 if len(ticks) > 30 else 10)
            ax.set_xlim(-0.75, max(positions.values(), default=0.0) + 0.75)
            ax.set(
                xlabel="Layer",
                ylabel=f"Log-odds gap narrowed\n(“{positive}” vs “{negative}”)",
                title=what,
            )
            ax.legend(fontsize=8)
        fig.suptitle(
            f"{ablations.capitalize()} ablation: top neurons vs. {draws} random draws from the "
            "same layer",
            fontweight="bold",
        )
        fig.tight_layout()
    return fig


#: The columns :func:`decoding_figure` reads from a decoding table (``decoding.csv``).
_DECODING_COLUMNS = ("layer", "k", "cv_auc", "shuffled_auc")


def decoding_figure(decoding: pd.DataFrame, *, model_auc: float | None) -> Figure:
    """How much does each layer know? The cross-validated AUC of probes on the ``k`` strongest
    neurons of each layer, for every ``k`` of the table.

    One line per ``k`` across the layers (a sequential colour map, light for ``k = 1`` to dark
    for the whole layer), the shuffled-label control as a grey band (per layer, from the lowest
    to the highest ``shuffled_auc`` over the ``k``'s), the model's own held-out AUC as a dashed
    line where it is given, and chance (0.5) as a dotted line.

    Parameters
    ----------
    decoding:
        The run's ``decoding.csv`` (:func:`neuronprobe.decoding.decode_layers`): one row per
        layer and ``k``, with at least the columns ``layer``, ``k`` (``"1"``... or ``"all"``),
        ``cv_auc`` and ``shuffled_auc`` (NaN without the control: no band).
    model_auc:
        The model's own held-out AUC (``run.json``'s ``behavior.auc``), or None: no dashed line.

    Returns
    -------
    matplotlib.figure.Figure
        One axes. Each ``k``'s line has ``gid="k=<label>"`` (``"k=all"`` for the whole layer),
        with the layers in increasing order; the band has ``gid="shuffled"``, the model's line
        ``gid="model"``, chance ``gid="chance"``.

    Raises
    ------
    ValueError
        If a column is missing or the table has no rows.
    """
    missing = [c for c in _DECODING_COLUMNS if c not in decoding.columns]
    if missing:
        raise ValueError(f"the decoding table has no column {missing[0]!r}")
    if decoding.empty:
        raise ValueError("the decoding table has no rows")
    plt = _pyplot()
    table = decoding.assign(
        layer=decoding["layer"].astype(int),
        k=decoding["k"].astype(str),
        cv_auc=decoding["cv_auc"].astype(float),
        shuffled_auc=decoding["shuffled_auc"].astype(float),
    )
    labels = sorted(table["k"].unique(), key=decode_k_order)
    layers = sorted(table["layer"].unique())
    colours = plt.get_cmap("viridis")(np.linspace(0.85, 0.0, len(labels)))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(8.0, 0.3 * len(layers) + 6), 4.0))
        control = table.groupby("layer")["shuffled_auc"].agg(["min", "max"]).dropna()
        if len(control):
            x_band = control.index.to_numpy(dtype=float)
            low, high = control["min"].to_numpy(), control["max"].to_numpy()
            if len(x_band) == 1:  # one layer: a band needs some width to show
                x_band, low, high = x_band + np.array([-0.3, 0.3]), low.repeat(2), high.repeat(2)
            ax.fill_between(
                x_band,
                low,
                high,
                color=[0.8, 0.8, 0.8],
                edgecolor=[0.6, 0.6, 0.6],
                linewidth=0.5,
                gid="shuffled",
                label="shuffled labels (lowest to highest over k)",
            )
        for label, colour in zip(labels, colours, strict=True):
            rows = table[table["k"] == label].sort_values("layer")
            ax.plot(
                rows["layer"].to_numpy(),
                rows["cv_auc"].to_numpy(),
                "o-",
                color=colour,
                markersize=4,
                linewidth=1.5,
                gid=f"k={label}",
                label="whole layer" if label == "all" else f"k = {label}",
            )
        if model_auc is not None:
            ax.axhline(
                float(model_auc),
                linestyle="--",
                color="#b3261e",
                linewidth=1.2,
                gid="model",
                label=f"model's own answer (AUC {float(model_auc):.2f})",
            )
        ax.axhline(
            0.5, linestyle=":", color="k", linewidth=0.8, gid="chance", label="chance (AUC 0.5)"
        )
        ax.set_xticks(
            layers, [str(layer) for layer in layers], fontsize=8 if len(layers) > 30 else 10
        )
        ax.set(
            xlabel="Layer",
            ylabel="cross-validated AUC",
            title="How much does each layer know?",
        )
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
    return fig
