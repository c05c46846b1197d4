"""The run directory: every file of a run, written so that nothing half-written looks finished.

Layout of a run directory::

    run.json              config, seed, versions, model and corpus identity, counts, timings
    contexts.parquet      one row per context (tokens, text, label, document id)
    activations.npy       float32 [layers, contexts, neurons], memory-mappable
    neurons.parquet       one row per (layer, neuron): beta, p-values, AUC, accuracies, significance
    neurons.csv           the same table as CSV
    layers.csv            the laminar profile (notebook part 4)
    figures/*.png|svg     the notebook's three figures
    report.html           one self-contained page: the question, the answer, figures, top neurons

Every file is written under a temporary name in the same folder and renamed into place
(:func:`atomic_path`), so an interrupted run never leaves a complete-looking partial file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CONTEXTS = "contexts.parquet"
ACTIVATIONS = "activations.npy"
NEURONS = "neurons.parquet"
NEURONS_CSV = "neurons.csv"
LAYERS = "layers.csv"
RUN_JSON = "run.json"
FIGURES = "figures"
REPORT = "report.html"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object written by :func:`write_json`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data
