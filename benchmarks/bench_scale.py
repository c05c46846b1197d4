"""Scaling benchmark of the Ray engine: scan and extraction with 1 and 2 Ray workers.

Starts a local Ray instance with two CPUs (this machine's), then measures, on the bundled model
(SmolLM2-135M) and corpus (the movie reviews):

- the scan (:func:`neuronprobe.distributed.scan_contexts_ray`): every document of the corpus
  (or ``--documents`` of them; read into memory first, so that the driver's reading of the CSV
  file is not what is timed), no stopping, with 1 and 2 scan workers; documents/s of the whole
  call, and each worker's own rate (characters/s inside its tasks);
- the extraction (:func:`neuronprobe.distributed.extract_to_file_ray`): ``--contexts`` contexts,
  every layer's ``mlp.pre`` (30 x 1,536 neurons), batches of 64, with 1 and 2 actors (one CPU
  and one torch thread each); contexts/s of the whole call (actor start and model load
  included), and after the first batch arrived (steady state).

The single-process engine (``scan_contexts``, ``extract_to_file``, in this process, torch's
default threads) is measured too, for reference. The 2-worker / 1-worker ratio is what counts:
on a 2-core machine the driver (reading the corpus, merging, writing the array) shares the
cores with the workers, so it stays below 2.

Then it estimates, from the measured per-worker rates, the wall time to scan all of C4 ``en``
``train`` and to extract gpt2-medium activations for 1 million contexts on N workers or GPUs;
every assumption is printed beside the numbers.

    python benchmarks/bench_scale.py            # whole corpus, 512 contexts (~2-3 min here)
    python benchmarks/bench_scale.py --quick    # 8,000 documents, 256 contexts (~1.5-3 min)

Measured on the development machine (2 CPU cores): see
the README's "Running on a Ray cluster" section for the output and the estimate.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "smollm2-135m"
SMOLLM2_PARAMETERS = 135e6  # SmolLM2-135M
GPT2_MEDIUM_PARAMETERS = 355e6
GPT2_MEDIUM_BYTES_PER_CONTEXT = 24 * 4096 * 4  # layers x mlp.pre neurons x float32
C4_DOCUMENTS = 365e6  # allenai/c4, en, train
C4_CHARACTERS_PER_DOCUMENT = 2200  # ~ 427 tokens x ~5 characters per token
#: Clearly an assumption (no GPU here): one A100/H100-class GPU, gpt2-medium in float32
#: (TF32 matmuls), 11-token contexts in batches of 512: ~6.7 GFLOP per context (2 x 303M
#: non-embedding parameters x 11 tokens) at ~15 TFLOP/s sustained.
GPU_CONTEXTS_PER_SECOND = 2000.0
#: Also an assumption: what one driver can take in (Ray object transfer + memory-mapped write)
#: before it, not the GPUs, limits the extraction. 1 GB/s ~ 2,500 gpt2-medium contexts/s.
DRIVER_BYTES_PER_SECOND = 1e9
WORKER_COUNTS = (1, 8, 64)


class _InMemory:
    """Documents read once into memory, as a corpus (the Ray engine shards it by document
    index): the scan is timed, not the driver's reading of the CSV file."""

    name = "movie-reviews"

    def __init__(self, documents: list[Any]) -> None:
        self.documents_list = documents

    def documents(self) -> Any:
        return iter(self.documents_list)


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def measure_scan(corpus: _InMemory, tokenizer: Any, shard_documents: int) -> dict[str, Any]:
    from neuronprobe.contexts import scan_contexts
    from neuronprobe.distributed import scan_contexts_ray

    results: dict[str, Any] = {}
    warm = corpus.documents_list[:shard_documents]  # the scanner's caches
    scan_contexts(warm, tokenizer, min_per_class=10**9, progress=False)
    start = time.perf_counter()
    local = scan_contexts(corpus.documents(), tokenizer, min_per_class=10**9, progress=False)
    results["local"] = {
        "seconds": time.perf_counter() - start,
        "documents": local.documents_scanned,
    }
    # Warm the worker processes (they import transformers to unpickle the tokenizer once).
    scan_contexts_ray(
        _InMemory(corpus.documents_list[: 2 * shard_documents]),
        tokenizer,
        min_per_class=10**9,
        shard_documents=shard_documents,
        workers=2,
        progress=False,
    )
    for workers in (1, 2):
        stats: dict[str, Any] = {}
        start = time.perf_counter()
        scan = scan_contexts_ray(
            corpus,
            tokenizer,
            min_per_class=10**9,
            shard_documents=shard_documents,
            workers=workers,
            progress=False,
            stats=stats,
        )
        seconds = time.perf_counter() - start
        assert scan.documents_scanned == local.documents_scanned
        assert scan.positive.tokens == local.positive.tokens  # the same scan
        results[workers] = {
            "seconds": seconds,
            "documents": scan.documents_scanned,
            "characters_per_worker_second": stats["characters_read"] / stats["task_seconds"],
            "documents_per_worker_second": stats["documents_read"] / stats["task_seconds"],
        }
    return results


def measure_extraction(loaded: Any, tokens: np.ndarray, folder: Path) -> dict[str, Any]:
    from neuronprobe.activations import extract_to_file
    from neuronprobe.distributed import extract_to_file_ray

    results: dict[str, Any] = {}
    start = time.perf_counter()
    expected = extract_to_file(
        loaded.model, tokens, folder / "local.npy", identity=loaded.identity, progress=False
    )
    results["local"] = {"seconds": time.perf_counter() - start, "contexts": len(tokens)}
    for actors in (1, 2):
        stats: dict[str, Any] = {}
        start = time.perf_counter()
        got = extract_to_file_ray(
            MODEL,
            tokens,
            folder / f"ray{actors}.npy",
            identity=loaded.identity,
            model=loaded.model,
            num_actors=actors,
            num_gpus_per_actor=0,
            progress=False,
            stats=stats,
        )
        stats["seconds_total"] = time.perf_counter() - start
        assert np.array_equal(got, expected), "the Ray engine gave other numbers"
        results[actors] = stats
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8,000 documents, 256 contexts")
    parser.add_argument("--documents", type=int, help="documents to scan (default: all)")
    parser.add_argument("--contexts", type=int, help="contexts to extract (default 512)")
    parser.add_argument("--shard-documents", type=int, default=2000)
    args = parser.parse_args()
    documents = args.documents or (8000 if args.quick else None)
    contexts_wanted = args.contexts or (256 if args.quick else 512)
    logging.basicConfig(level=logging.WARNING)

    import ray

    from neuronprobe.contexts import collect_contexts
    from neuronprobe.distributed import connect
    from neuronprobe.models import load_model
    from neuronprobe.text import open_corpus

    loaded = load_model(MODEL, device="cpu")
    corpus = _InMemory(list(itertools.islice(open_corpus("movie-reviews").documents(), documents)))
    connect(None, num_cpus=2)
    folder = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        scan = measure_scan(corpus, loaded.tokenizer, args.shard_documents)
        contexts = collect_contexts(
            open_corpus("movie-reviews").documents(),
            loaded.tokenizer,
            min_per_class=contexts_wanted // 2,
            progress=False,
        )
        tokens = contexts.tokens[:contexts_wanted]
        extraction = measure_extraction(loaded, tokens, folder)
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)

    cores = os.cpu_count()
    print(
        f"machine: {cores} CPU cores; Ray: 1 CPU per worker; model {MODEL}; "
        f"corpus movie-reviews ({scan[1]['documents']:,} documents scanned)"
    )
    print()
    print(f"{'':34}{'local':>12}{'1 worker':>12}{'2 workers':>12}{'2 / 1':>8}")

    def row(label: str, local: float, one: float, two: float) -> None:
        cells = "".join(f"{v:12,.1f}" for v in (local, one, two))
        print(f"{label:34}{cells}{two / one:8.2f}")

    rate = {k: v["documents"] / v["seconds"] for k, v in scan.items()}
    row("scan, documents/s", rate["local"], rate[1], rate[2])
    per_worker = scan[1]["characters_per_worker_second"]
    print(
        f"{'scan, characters/s in one worker':34}{'':12}{per_worker:12,.0f}"
        f"{scan[2]['characters_per_worker_second']:12,.0f}"
    )
    local_rate = extraction["local"]["contexts"] / extraction["local"]["seconds"]
    whole = {k: extraction[k]["contexts"] / extraction[k]["seconds_total"] for k in (1, 2)}
    steady = {k: extraction[k]["steady_contexts_per_second"] for k in (1, 2)}
    row(f"extraction ({len(tokens)}), contexts/s", local_rate, whole[1], whole[2])
    row("  after the first batch, contexts/s", local_rate, steady[1], steady[2])
    print(
        f"{'  actor start + model load, s':34}{'':12}"
        f"{extraction[1]['seconds_to_first_batch']:12.1f}"
        f"{extraction[2]['seconds_to_first_batch']:12.1f}"
    )
    print("(local: one process with torch's default threads; Ray workers: one thread each.)")

    # ------------------------------------------------------------------ estimates
    characters = C4_DOCUMENTS * C4_CHARACTERS_PER_DOCUMENT
    cpu_gpt2 = steady[1] * SMOLLM2_PARAMETERS / GPT2_MEDIUM_PARAMETERS
    total_bytes = 1e6 * GPT2_MEDIUM_BYTES_PER_CONTEXT
    driver_limit = DRIVER_BYTES_PER_SECOND / GPT2_MEDIUM_BYTES_PER_CONTEXT
    print()
    print("Estimates (linear in N from the measured 1-worker rates; assumptions below):")
    print(f"{'N workers':>12}{'scan all of C4':>18}{'1M ctx, N CPUs':>18}{'1M ctx, N GPUs':>18}")
    for n in WORKER_COUNTS:
        scan_s = characters / (per_worker * n)
        cpu_s = 1e6 / (cpu_gpt2 * n)
        gpu_rate = min(GPU_CONTEXTS_PER_SECOND * n, driver_limit)
        gpu_s = 1e6 / gpu_rate
        bound = " (driver)" if GPU_CONTEXTS_PER_SECOND * n > driver_limit else ""
        print(f"{n:>12}{duration(scan_s):>18}{duration(cpu_s):>18}{duration(gpu_s) + bound:>18}")
    print()
    print(
        f"- C4 en train: {C4_DOCUMENTS / 1e6:.0f}M documents x ~{C4_CHARACTERS_PER_DOCUMENT:,} "
        f"characters = {characters / 1e12:.2f} T characters at {per_worker:,.0f} characters/s "
        "per worker (measured: tokenizing around the target, merging excluded); reading and "
        "decompressing C4's json.gz shards is not included, and a run with --min-per-class "
        "stops long before the end."
    )
    print(
        f"- gpt2-medium on CPU: the measured SmolLM2 rate per worker ({steady[1]:.1f} contexts/s, "
        f"one thread) x 135M / 355M parameters = {cpu_gpt2:.1f} contexts/s per worker."
    )
    print(
        f"- gpt2-medium on GPUs: ASSUMED {GPU_CONTEXTS_PER_SECOND:,.0f} contexts/s per GPU "
        "(A100/H100 class, float32, batches of 512; not measured: no GPU here), and ASSUMED "
        f"{DRIVER_BYTES_PER_SECOND / 1e9:.0f} GB/s into the one driver that writes the array "
        f"(= {driver_limit:,.0f} contexts/s): '(driver)' marks where that, not the GPUs, "
        "decides."
    )
    print(
        f"- The array: 24 layers x 4,096 neurons x 4 bytes = {GPT2_MEDIUM_BYTES_PER_CONTEXT / 1e3:.0f}"
        f" KB per context, {total_bytes / 1e9:.0f} GB for 1M contexts on the driver's disk "
        "(memory-mapped; the statistics read it layer by layer)."
    )


if __name__ == "__main__":
    main()
