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
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from neuronprobe.errors import NeuronprobeError

CONTEXTS = "contexts.parquet"
ACTIVATIONS = "activations.npy"
NEURONS = "neurons.parquet"
NEURONS_CSV = "neurons.csv"
LAYERS = "layers.csv"
RUN_JSON = "run.json"
FIGURES = "figures"
REPORT = "report.html"

_TEMPORARY = ".partial-"  # ".<name>.partial-<pid>": what atomic_path writes before renaming


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The block may write a file or a folder there; either way, ``path`` appears whole or not at
    all (on one file system a rename is atomic), and the temporary is removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}{_TEMPORARY}{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        _remove(temporary)


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


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory (created if missing) while the block runs.

    Two processes writing one run directory would interleave their files; the second is
    refused.  The lock is ``flock`` on the folder itself (no lock file to leave behind), so the
    system releases it when its process ends, even on a kill.  Where ``flock`` does not exist
    (Windows) there is no lock.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NeuronprobeError(f"--out {directory} is a file; name a folder for the run.")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        if sys.platform == "win32":
            yield
            return
        import fcntl

        handle = os.open(directory, os.O_RDONLY)
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise NeuronprobeError(
                    f"--out {directory} is being written by another neuronprobe process; wait "
                    "for it to finish, or choose another --out."
                ) from None
            _remove_temporaries(directory)
            yield
        finally:
            os.close(handle)  # closing releases the lock
    except BaseException:
        if created and not any(directory.iterdir()):
            directory.rmdir()  # bad input found before anything was written: leave no trace
        raise


def _remove_temporaries(directory: Path) -> None:
    """Delete what :func:`atomic_path` left behind when a process writing here was killed.

    Called with the directory's lock held, so no other process is writing any of them.
    """
    for path in list(directory.rglob(f".*{_TEMPORARY}*")):
        _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
