"""The run directory: every file of a run, written so that nothing half-written looks finished.

Layout of a run directory::

    run.json              config, seed, versions, model and corpus identity, counts, timings
    contexts.parquet      one row per context (tokens, text, label, document id)
    activations.npy       float32 [layers, contexts, neurons], memory-mappable
    neurons.parquet       one row per (layer, neuron): beta, p-values, AUC, accuracies, significance
    neurons.csv           the same table as CSV
    layers.csv            the laminar profile (notebook part 4)
    split.csv             the train/test split of the statistics
    interventions.parquet the strongest neurons changed, against random ones
    decoding.csv          cross-validated probes on each layer's k strongest neurons
    figures/*.png|svg     the notebook's three figures
    report.html           one self-contained page: the question, the answer, figures, top neurons

Every file is written under a temporary name in the same folder and renamed into place
(:func:`atomic_path`), so an interrupted run never leaves a complete-looking partial file.
Files damaged afterwards (a full disk, a killed copy, an edit by hand) are found by
:func:`file_problem`, which checks each file against what ``run.json`` says it holds; every
stage checks the files it reads with :func:`check_files`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from neuronprobe.errors import NeuronprobeError

CONTEXTS = "contexts.parquet"
ACTIVATIONS = "activations.npy"
NEURONS = "neurons.parquet"
NEURONS_CSV = "neurons.csv"
LAYERS = "layers.csv"
SPLIT = "split.csv"
INTERVENTIONS = "interventions.parquet"
DECODING = "decoding.csv"
RUN_JSON = "run.json"
FIGURES = "figures"
REPORT = "report.html"
HISTORY = "history"

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
    # The folders this call creates, deepest first (``runs/<time>`` may create ``runs/`` too).
    created = [p for p in (directory, *directory.parents) if not p.exists()]
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
        # Bad input found before anything was written: leave no trace, not even an empty runs/.
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
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


def read_neurons(directory: Path) -> Any:
    """``neurons.parquet`` as a DataFrame (runs written before ``threshold`` was renamed
    ``pvalue_threshold`` are read with the new name)."""
    import pandas as pd

    table = pd.read_parquet(Path(directory) / NEURONS)
    return table.rename(columns={"threshold": "pvalue_threshold"})


def history_folder(directory: Path, reason: str) -> Path:
    """A new, free ``history/<UTC time>-<reason>`` folder name in ``directory`` (not created).

    The one naming scheme of everything set aside: ``reason`` says what put it there
    (``refit``: the statistics a ``neuronprobe probe`` replaced; ``replaced``: a whole run that
    ``--force`` set aside). A second one in the same second gets ``-2``, ``-3``...
    """
    name = f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{reason}"
    target = directory / HISTORY / name
    suffix = 1
    while target.exists():
        suffix += 1
        target = directory / HISTORY / f"{name}-{suffix}"
    return target


# ----------------------------------------------------------------------------------------------
# Damaged files: each file checked against what run.json says it holds
# ----------------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"  # the last chunk of every complete PNG file, with its CRC
#: Columns every table must have (a file with others is not the file the run wrote).
#: The columns of ``decoding.csv``, in order (:func:`neuronprobe.decoding.decode_layers`).
DECODING_COLUMNS = (
    "layer",
    "k",
    "neurons_used",
    "cv_acc",
    "cv_acc_sd",
    "cv_auc",
    "cv_auc_sd",
    "shuffled_auc",
    "shuffled_auc_sd",
    "selected",
)

_COLUMNS = {
    CONTEXTS: ("context", "label", "document_id", "tokens", "text"),
    NEURONS: ("layer", "neuron", "beta", "pvalue", "pvalue_adj", "significant"),
    NEURONS_CSV: ("layer", "neuron", "beta", "pvalue", "pvalue_adj", "significant"),
    LAYERS: ("layer", "neurons", "significant", "percent_significant"),
    SPLIT: ("context", "split"),
    INTERVENTIONS: ("layer", "k", "selection", "draw", "auc_before", "auc_after"),
    DECODING: DECODING_COLUMNS,
}


def file_problem(directory: Path, name: str, record: dict[str, Any]) -> str | None:
    """What is wrong with the run file ``name`` in ``directory``, or None if it looks whole.

    ``name`` is a file of the run directory (``contexts.parquet``, ``activations.npy``,
    ``neurons.parquet``, ``figures/layers.png``...). A file is damaged when it is missing, is
    not of its format (a Parquet footer, an ``.npy`` header, a PNG's last chunk, the end of an
    SVG or of the HTML page), or does not hold what ``record`` (``run.json``) says: the
    number of contexts, the activations' shape, one table row per neuron or layer. Content
    is not hashed, so a file rewritten with the right shape but other numbers is not found.

    Returns
    -------
    str or None
        A few words that follow "the file is" (``missing``, ``truncated: 1,024 of 4,096
        bytes``...), or None.
    """
    path = Path(directory) / name
    if not path.is_file():
        return "missing"
    shape = record.get("activations", {}).get("shape")
    contexts = record.get("counts", {}).get("contexts")
    neurons = shape[0] * shape[2] if shape else None
    try:
        if name == ACTIVATIONS:
            return npy_problem(path, shape)
        if path.suffix == ".npy":  # the model's answer beside the activations: [contexts, 2]
            return npy_problem(path, [contexts, 2] if contexts is not None else None)
        if name in (CONTEXTS, NEURONS):
            return _parquet_problem(path, contexts if name == CONTEXTS else neurons, _COLUMNS[name])
        if name == INTERVENTIONS:
            rows = record.get("interventions", {}).get("rows")
            return _parquet_problem(path, rows, _COLUMNS[name])
        if name == NEURONS_CSV:
            return _csv_problem(path, neurons, _COLUMNS[name])
        if name == LAYERS:
            return _csv_problem(path, shape[0] if shape else None, _COLUMNS[name])
        if name == SPLIT:
            return _csv_problem(path, contexts, _COLUMNS[name])
        if name == DECODING:
            rows = record.get("decoding", {}).get("rows")
            return _csv_problem(path, rows, _COLUMNS[name])
        if path.suffix == ".json":
            read_json(path)
            return None
        if name == REPORT:
            return None if _tail(path).rstrip().endswith(b"</html>") else "not a whole HTML page"
        if path.suffix == ".png":
            whole = path.read_bytes()
            if not whole.startswith(_PNG_SIGNATURE):
                return "not a PNG image"
            return None if whole.endswith(_PNG_END) else "a truncated PNG image"
        if path.suffix == ".svg":
            return None if _tail(path).rstrip().endswith(b"</svg>") else "not a whole SVG image"
    except (OSError, ValueError, UnicodeDecodeError) as error:
        return f"unreadable ({' '.join(str(error).split())})"
    return None


def figure_files(
    directory: Path,
    record: dict[str, Any],
    stages: Sequence[str] = ("statistics", "interventions", "decoding"),
) -> list[str]:
    """The figure files of a run (``figures/<name>.png`` and ``.svg``): those ``run.json``
    lists for ``stages`` (``statistics.figures``, ``interventions.figures``,
    ``decoding.figures``), or, for a run that lists none, those in ``figures/``."""
    listed = [record[stage]["figures"] for stage in stages if "figures" in record.get(stage, {})]
    if listed:
        names = [name for names in listed for name in names]
    else:
        names = [path.stem for path in sorted((Path(directory) / FIGURES).glob("*.png"))]
    return [f"{FIGURES}/{name}.{ext}" for name in names for ext in ("png", "svg")]


def check_files(directory: Path, names: Iterable[str], record: dict[str, Any], fix: str) -> None:
    """Raise a one-line :class:`NeuronprobeError` naming the first damaged file of ``names``.

    ``fix`` says what to do (the command that recomputes it).
    """
    for name in names:
        problem = file_problem(directory, name, record)
        if problem is not None:
            raise NeuronprobeError(f"{Path(directory) / name} is {problem}; {fix}.")


def _tail(path: Path, size: int = 64) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - size))
        return handle.read()


def npy_problem(path: Path, shape: Sequence[int] | None) -> str | None:
    """What is wrong with an ``.npy`` file that should hold an array of ``shape`` (None: any
    shape), or None: its header must read, and its size be the header's plus the data's."""
    import numpy as np

    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            stored, _, dtype = read_header(handle)
        except ValueError:
            return "not an .npy array"
        header = handle.tell()
    if shape is not None and list(stored) != list(shape):
        return f"of shape {list(stored)}, but run.json records {list(shape)}"
    expected = header + int(np.prod(stored)) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        if size < expected:
            return f"truncated: {size:,} of {expected:,} bytes"
        return f"longer than its header says: {size:,} bytes where {expected:,} are expected"
    return None


def _parquet_problem(path: Path, rows: int | None, columns: Sequence[str]) -> str | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(path)
        names = set(metadata.schema.to_arrow_schema().names)
    except (pa.ArrowException, OSError) as error:
        return f"not a readable Parquet file: {' '.join(str(error).split())}"
    missing = [column for column in columns if column not in names]
    if missing:
        return f"without the column {missing[0]!r}"
    if rows is not None and metadata.num_rows != rows:
        return f"holding {metadata.num_rows:,} rows, but run.json records {rows:,}"
    return None


def _csv_problem(path: Path, rows: int | None, columns: Sequence[str]) -> str | None:
    data = path.read_bytes()
    header, _, _ = data.partition(b"\n")
    names = header.decode("utf-8").strip().split(",")
    missing = [column for column in columns if column not in names]
    if missing:
        return f"without the column {missing[0]!r} in its header"
    if not data.endswith(b"\n"):
        return "truncated: its last line is cut"
    lines = data.count(b"\n")
    if rows is not None and lines - 1 != rows:
        return f"holding {lines - 1:,} rows, but run.json records {rows:,}"
    return None
