"""Stage 2, contexts: find the two kinds of context in the text, balanced and seeded.

Entry point: :func:`collect_contexts` (documents + tokenizer + :class:`Contrast` ->
:class:`Contexts`). The rule is the notebook's, token for token: for every position ``ti``
(``context_length <= ti < len(tokens) - 1``) whose token is the target, the context is
``tokens[ti - context_length : ti + 1]``; it is *positive* ("can't") when the following
tokens are one of the positive followers, *negative* ("can") when the next token starts with a
space and is not the first token of an excluded word. Scanning stops, between documents, once
both classes have ``min_per_class`` contexts; then both classes are sampled down to the size of
the smaller one with the run's seed (the notebook's balancing step, without its ``randperm`` bug).
Two options the notebook lacks: exact duplicate contexts are dropped (on by default), and curly
apostrophes can be read as ``'`` (off by default). The tokenizing is done by
:mod:`neuronprobe.scanner`, on windows around the target where that provably gives the
whole-document tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from neuronprobe.errors import NeuronprobeError, check_known_keys
from neuronprobe.rundir import atomic_path
from neuronprobe.text import Document

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Contrast:
    """Two kinds of context that end in the same target token.

    Attributes
    ----------
    target:
        The word whose last-token activations are compared; must be one token (`` can``).
    positive_followers:
        Text that, following the target, makes the context positive (``'t``). Each is
        tokenized on its own and matched as a token sequence.
    excluded_followers:
        Words whose first token, following the target, excludes the context from the negative
        class (after "can", these make it a noun: `` of``, `` with``...).
    context_length:
        Tokens kept before the target; contexts are ``context_length + 1`` tokens long.
    positive_name, negative_name:
        How tables and figures name the classes.
    """

    target: str = " can"
    positive_followers: tuple[str, ...] = ("'t",)
    excluded_followers: tuple[str, ...] = (" of", " with", " from", " in", " on", " for", " not")
    context_length: int = 10
    positive_name: str = "can't"
    negative_name: str = "can"

    def __post_init__(self) -> None:
        for name in ("target", "positive_name", "negative_name"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise NeuronprobeError(f"contrast {name} must be a non-empty string.")
        for name in ("positive_followers", "excluded_followers"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise NeuronprobeError(
                    f"contrast {name} must be a list of non-empty strings (got {value!r})."
                )
        if not isinstance(self.context_length, int) or isinstance(self.context_length, bool):
            raise NeuronprobeError(
                f"contrast context_length must be an integer (got {self.context_length!r})."
            )
        if self.context_length < 0:
            raise NeuronprobeError(
                f"contrast context_length must be >= 0 (got {self.context_length})."
            )
        if not self.positive_followers:
            raise NeuronprobeError('contrast needs at least one positive follower (such as "\'t").')
        # JSON round trips give lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "positive_followers", tuple(self.positive_followers))
        object.__setattr__(self, "excluded_followers", tuple(self.excluded_followers))

    def describe(self) -> str:
        """One line in words: what is told apart from what."""
        followers = " or ".join(repr(f) for f in self.positive_followers)
        return (
            f"{self.target!r} followed by {followers} ({self.positive_name!r}) versus {self.target!r}"
            f" followed by a space-initial token other than "
            f"{', '.join(repr(w) for w in self.excluded_followers)} ({self.negative_name!r}); "
            f"{self.context_length} tokens of context before the target"
        )

    @classmethod
    def from_toml(cls, path: Path | str) -> Contrast:
        """Read a contrast from a TOML file with the dataclass's keys (see ``examples/contrasts``).

        Raises
        ------
        NeuronprobeError
            If the file is missing, is not TOML, or has unknown or ill-typed keys.
        """
        import tomllib

        path = Path(path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise NeuronprobeError(f"--contrast {path}: no such file; give a TOML file.") from error
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise NeuronprobeError(f"--contrast {path} is not valid TOML: {error}.") from error
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Contrast:
        check_known_keys(values, (f.name for f in dataclasses.fields(cls)), "contrast")
        return cls(**values)


@dataclass(frozen=True)
class ContrastTokens:
    """A :class:`Contrast` resolved against one tokenizer."""

    target_id: int
    positive_sequences: tuple[tuple[int, ...], ...]
    excluded_ids: frozenset[int]


def resolve_contrast(contrast: Contrast, tokenizer: Any) -> ContrastTokens:
    """Token ids of the contrast's words under ``tokenizer`` (no special tokens added).

    Raises
    ------
    NeuronprobeError
        If the target is not exactly one token (the message shows how it splits), or a
        follower is empty.
    """
    target_ids = _encode(tokenizer, contrast.target)
    if len(target_ids) != 1:
        pieces = [tokenizer.decode([token]) for token in target_ids]
        raise NeuronprobeError(
            f"the contrast target {contrast.target!r} is {len(target_ids)} tokens for this "
            f"tokenizer ({target_ids} = {pieces}); choose a target that is a single token."
        )
    positive = []
    for follower in contrast.positive_followers:
        ids = _encode(tokenizer, follower)
        if not ids:
            raise NeuronprobeError(f"the positive follower {follower!r} encodes to no tokens.")
        positive.append(tuple(ids))
    excluded = {ids[0] for word in contrast.excluded_followers if (ids := _encode(tokenizer, word))}
    return ContrastTokens(target_ids[0], tuple(positive), frozenset(excluded))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


#: Apostrophes that a tokenizer splits differently from "'" (the notebook's "FYI" cells):
#: right and left single quotation marks, modifier letter apostrophe, prime, Armenian
#: apostrophe, fullwidth apostrophe. Each is one character, so offsets do not move.
APOSTROPHES = "\u2019\u2018\u02bc\u2032\u055a\uff07"
_TO_ASCII_APOSTROPHE = str.maketrans(dict.fromkeys(APOSTROPHES, "'"))


@dataclass
class Contexts:
    """Balanced contexts of the two classes, negative class first (as the notebook's labels).

    Attributes
    ----------
    tokens:
        int64 [contexts, context_length + 1]; the last column is the target.
    labels:
        bool [contexts]; True = positive class ("can't").
    document_ids:
        [contexts] id of the document each context comes from.
    sources:
        [contexts] the part of the corpus that document comes from (``imdb``, a file, ...).
    offsets:
        int64 [contexts] character offset of the target's text in its document (-1 where a
        slow tokenizer cannot say).
    next_tokens:
        int64 [contexts] the token that follows the target (not part of the context).
    counts:
        Documents scanned, contexts found and duplicates dropped per class, contexts kept per
        class, and how many positive contexts each spelling of the follower gave.
    """

    tokens: np.ndarray
    labels: np.ndarray
    document_ids: list[str]
    sources: list[str]
    offsets: np.ndarray
    next_tokens: np.ndarray
    counts: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


_COLUMNS = ("tokens", "document_ids", "sources", "offsets", "next_tokens")


@dataclass
class _Found:
    """The contexts of one class, in corpus order; exact duplicates are counted, not kept."""

    drop_duplicates: bool = True
    tokens: list[list[int]] = field(default_factory=list)
    document_ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    next_tokens: list[int] = field(default_factory=list)
    duplicates: int = 0
    _seen: set[tuple[int, ...]] = field(default_factory=set, repr=False)

    def add(
        self, tokens: list[int], document_id: str, source: str, offset: int, next_token: int
    ) -> bool:
        """Keep a context unless it repeats one already kept; say whether it was kept."""
        if self.drop_duplicates:
            key = tuple(tokens)
            if key in self._seen:
                self.duplicates += 1
                return False
            self._seen.add(key)
        self.tokens.append(tokens)
        self.document_ids.append(document_id)
        self.sources.append(source)
        self.offsets.append(offset)
        self.next_tokens.append(next_token)
        return True

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Scan:
    """Every context found by :func:`scan_contexts`, per class, in corpus order (not balanced).

    ``spellings`` counts the kept positive contexts by the follower's text as written in the
    document (``'t`` or ``’t`` ...): with apostrophe normalisation, each spelling's share.

    A scan is built document by document, in corpus order, with :meth:`add_document`; the
    stopping rule is :meth:`satisfied`. The single-process scan and the Ray engine
    (:mod:`neuronprobe.distributed`, which finds the candidates of many documents in parallel
    and merges them here in corpus order) share these two steps, so they give the same scan.
    """

    positive: _Found
    negative: _Found
    documents_scanned: int
    spellings: Counter[str] = field(default_factory=Counter)

    @classmethod
    def empty(cls, drop_duplicates: bool = True) -> Scan:
        """A scan of no documents yet."""
        return cls(_Found(drop_duplicates), _Found(drop_duplicates), 0)

    def satisfied(self, min_per_class: int) -> bool:
        """Whether both classes have ``min_per_class`` contexts: the scan stops before the next
        document (checked before each document, as the notebook's loop does)."""
        return len(self.positive) >= min_per_class and len(self.negative) >= min_per_class

    def add_document(
        self, document_id: str, source: str, candidates: Sequence[Candidate] = ()
    ) -> None:
        """Count one more scanned document and keep its candidates (duplicates dropped)."""
        self.documents_scanned += 1
        for candidate in candidates:
            found = self.positive if candidate.positive else self.negative
            kept = found.add(
                list(candidate.tokens),
                document_id,
                source,
                candidate.offset,
                candidate.next_token,
            )
            if kept and candidate.positive:
                self.spellings[candidate.spelling] += 1


class Candidate(NamedTuple):
    """One context of one class found in a document, before duplicates are dropped.

    Attributes
    ----------
    positive:
        True for the positive class ("can't").
    tokens:
        ``context_length + 1`` token ids; the last is the target.
    offset:
        Character offset of the target's text in the document (-1 if unknown).
    next_token:
        The token after the target.
    spelling:
        For positive contexts, the follower as the document writes it (``'t``, ``’t``); else "".
    """

    positive: bool
    tokens: tuple[int, ...]
    offset: int
    next_token: int
    spelling: str


class ContextFinder:
    """The per-document half of the scan: the candidates of each document, found in batches.

    Independent of every other document, so documents can be handled anywhere (another
    process, another machine) and merged in corpus order with :meth:`Scan.add_document`.
    Picklable (it holds the tokenizer, a contrast and small caches).

    Parameters
    ----------
    tokenizer:
        A Hugging Face tokenizer (see :func:`collect_contexts`).
    contrast:
        What to find; the notebook's "can" / "can't" by default.
    normalize_apostrophes:
        See :func:`scan_contexts`.
    """

    def __init__(
        self, tokenizer: Any, contrast: Contrast | None = None, normalize_apostrophes: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.contrast = contrast or Contrast()
        self.normalize_apostrophes = normalize_apostrophes
        self.ids = resolve_contrast(self.contrast, tokenizer)
        self.after = max(len(sequence) for sequence in self.ids.positive_sequences)
        self.follower_texts = {
            seq: tokenizer.decode(list(seq)) for seq in self.ids.positive_sequences
        }
        self._space_initial: dict[int, bool] = {}

    def _text_of(self, document: Document) -> str:
        if self.normalize_apostrophes:
            return document.text.translate(_TO_ASCII_APOSTROPHE)
        return document.text

    def find(self, documents: Sequence[Document]) -> list[list[Candidate]]:
        """The candidates of each document, in document order (one list per document)."""
        from neuronprobe.scanner import target_hits

        if not documents:
            return []
        contrast, ids = self.contrast, self.ids
        # Exactly the whole-document tokens' hits, from windows where that is provably the same
        # (see neuronprobe.scanner). Token indices are not needed (the character offset locates
        # a context), which saves most of the work.
        all_hits = target_hits(
            [self._text_of(document) for document in documents],
            self.tokenizer,
            ids.target_id,
            contrast.target,
            contrast.context_length,
            self.after,
            with_index=False,
        )
        found: list[list[Candidate]] = []
        for document, hits in zip(documents, all_hits, strict=True):
            candidates: list[Candidate] = []
            for hit in hits:
                following = hit.following
                next_token = following[0]
                matched = next(
                    (seq for seq in ids.positive_sequences if tuple(following[: len(seq)]) == seq),
                    None,
                )
                if matched is not None:
                    spelling = _spelling(
                        document.text, hit.offset, contrast, self.follower_texts[matched]
                    )
                    candidates.append(
                        Candidate(True, tuple(hit.context), hit.offset, next_token, spelling)
                    )
                elif next_token not in ids.excluded_ids and _space_initial(
                    self.tokenizer, next_token, self._space_initial
                ):
                    candidates.append(
                        Candidate(False, tuple(hit.context), hit.offset, next_token, "")
                    )
            found.append(candidates)
        return found

    def iterate(
        self, documents: Iterable[Document], batch_documents: int = 256
    ) -> Iterator[tuple[Document, list[Candidate]]]:
        """``(document, its candidates)`` for each document in order, found in batches."""
        batch: list[Document] = []
        for document in documents:
            batch.append(document)
            if len(batch) >= batch_documents:
                yield from zip(batch, self.find(batch), strict=True)
                batch = []
        if batch:
            yield from zip(batch, self.find(batch), strict=True)


def scan_contexts(
    documents: Iterable[Document],
    tokenizer: Any,
    contrast: Contrast | None = None,
    *,
    min_per_class: int = 500,
    drop_duplicates: bool = True,
    normalize_apostrophes: bool = False,
    batch_documents: int = 256,
    progress: bool = True,
) -> Scan:
    """Scan documents in order until both classes have ``min_per_class`` contexts.

    The stopping rule is checked before each document, as the notebook's loop does, so the
    document that crosses the line is scanned to its end. Duplicates do not count toward
    ``min_per_class`` when they are dropped.

    Parameters
    ----------
    drop_duplicates:
        Keep only the first of identical contexts (same tokens) within a class; the corpora
        repeat documents (IMDB holds duplicate reviews). The notebook keeps them.
    normalize_apostrophes:
        Read every apostrophe in :data:`APOSTROPHES` as ``'`` before tokenizing, so that
        ``can’t`` counts as ``can't``. Off by default, as the notebook.
    """
    from tqdm.auto import tqdm

    contrast = contrast or Contrast()
    finder = ContextFinder(tokenizer, contrast, normalize_apostrophes)
    scan = Scan.empty(drop_duplicates)
    bar = tqdm(desc="scanning documents", unit=" docs", disable=not progress, mininterval=0.5)
    try:
        for document, candidates in finder.iterate(documents, batch_documents):
            if scan.satisfied(min_per_class):
                break
            scan.add_document(document.id, document.source, candidates)
            bar.update(1)
            if candidates:
                bar.set_postfix(
                    {
                        contrast.positive_name: len(scan.positive),
                        contrast.negative_name: len(scan.negative),
                    },
                    refresh=False,
                )
    finally:
        bar.close()
    return scan


def _spelling(text: str, offset: int, contrast: Contrast, follower: str) -> str:
    """The follower as the document writes it (before any normalisation)."""
    if offset < 0:
        return follower
    start = offset + len(contrast.target)
    return text[start : start + len(follower)]


def balance_contexts(scan: Scan, *, seed: int = 0) -> Contexts:
    """Sample both classes down to the smaller one's size with ``seed``.

    Returns the negatives first, then the positives, each kept in corpus order.
    """
    per_class = min(len(scan.positive), len(scan.negative))
    rng = np.random.default_rng(seed)
    keep_negative = np.sort(rng.choice(len(scan.negative), per_class, replace=False))
    keep_positive = np.sort(rng.choice(len(scan.positive), per_class, replace=False))

    def pick(found: _Found, keep: np.ndarray, name: str) -> list[Any]:
        column = getattr(found, name)
        return [column[i] for i in keep.tolist()]

    columns = {
        name: pick(scan.negative, keep_negative, name) + pick(scan.positive, keep_positive, name)
        for name in _COLUMNS
    }
    width = len(columns["tokens"][0]) if per_class else 0
    return Contexts(
        tokens=np.asarray(columns["tokens"], dtype=np.int64).reshape(2 * per_class, width),
        labels=np.repeat([False, True], per_class),
        document_ids=columns["document_ids"],
        sources=columns["sources"],
        offsets=np.asarray(columns["offsets"], dtype=np.int64),
        next_tokens=np.asarray(columns["next_tokens"], dtype=np.int64),
        counts={
            "documents_scanned": scan.documents_scanned,
            "found_positive": len(scan.positive),
            "found_negative": len(scan.negative),
            "duplicates_dropped_positive": scan.positive.duplicates,
            "duplicates_dropped_negative": scan.negative.duplicates,
            "kept_per_class": per_class,
            "positive_spellings": dict(scan.spellings.most_common()),
        },
    )


def collect_contexts(
    documents: Iterable[Document],
    tokenizer: Any,
    contrast: Contrast | None = None,
    *,
    min_per_class: int = 500,
    seed: int = 0,
    drop_duplicates: bool = True,
    normalize_apostrophes: bool = False,
    progress: bool = True,
) -> Contexts:
    """Find both classes of context in the documents and balance them: the stage's entry point.

    Parameters
    ----------
    documents:
        The corpus, in order (see :mod:`neuronprobe.text`).
    tokenizer:
        A Hugging Face tokenizer; documents are encoded without special tokens, as the
        notebook's ``tokenizer.encode`` does for GPT-2.
    contrast:
        What to collect; the notebook's "can" / "can't" by default.
    min_per_class:
        Stop once both classes have at least this many contexts.
    seed:
        Seeds the sampling that balances the classes.
    drop_duplicates, normalize_apostrophes:
        See :func:`scan_contexts`.

    Returns
    -------
    Contexts
        ``2 * n`` contexts, ``n`` = the smaller class's count: negatives first, then positives,
        each in corpus order.

    Raises
    ------
    NeuronprobeError
        If the corpus ends before both classes reach ``min_per_class``.
    """
    contrast = contrast or Contrast()
    scan = scan_contexts(
        documents,
        tokenizer,
        contrast,
        min_per_class=min_per_class,
        drop_duplicates=drop_duplicates,
        normalize_apostrophes=normalize_apostrophes,
        progress=progress,
    )
    return finish_scan(scan, contrast, min_per_class=min_per_class, seed=seed)


def finish_scan(scan: Scan, contrast: Contrast, *, min_per_class: int, seed: int) -> Contexts:
    """Check that the scan reached ``min_per_class`` and balance it with ``seed``.

    The last step of :func:`collect_contexts`, shared with the Ray engine.

    Raises
    ------
    NeuronprobeError
        If the corpus ended before both classes reached ``min_per_class``.
    """
    if not scan.satisfied(min_per_class):
        raise NeuronprobeError(
            f"the corpus ended after {scan.documents_scanned} documents with {len(scan.positive)} "
            f"{contrast.positive_name!r} and {len(scan.negative)} {contrast.negative_name!r} "
            f"contexts, fewer than --min-per-class {min_per_class}; lower --min-per-class or use "
            "a larger corpus."
        )
    contexts = balance_contexts(scan, seed=seed)
    logger.info(
        "scanned %d documents: %d %r and %d %r contexts (%d and %d duplicates dropped); "
        "kept %d per class",
        scan.documents_scanned,
        len(scan.positive),
        contrast.positive_name,
        len(scan.negative),
        contrast.negative_name,
        scan.positive.duplicates,
        scan.negative.duplicates,
        contexts.counts["kept_per_class"],
    )
    return contexts


def _space_initial(tokenizer: Any, token: int, cache: dict[int, bool]) -> bool:
    # The notebook's test: tokenizer.decode(next_token).startswith(' ').
    if token not in cache:
        cache[token] = tokenizer.decode([token]).startswith(" ")
    return cache[token]


def save_contexts(contexts: Contexts, path: Path, tokenizer: Any, contrast: Contrast) -> None:
    """Write ``contexts.parquet``: one row per context, with its text for people to read."""
    import pandas as pd

    table = pd.DataFrame(
        {
            "context": np.arange(len(contexts), dtype=np.int64),
            "label": contexts.labels,
            "class": np.where(contexts.labels, contrast.positive_name, contrast.negative_name),
            "document_id": contexts.document_ids,
            "source": contexts.sources,
            "offset": contexts.offsets,
            "tokens": list(contexts.tokens),
            "next_token": contexts.next_tokens,
            "text": tokenizer.batch_decode(contexts.tokens.tolist()),
            "next_text": tokenizer.batch_decode(contexts.next_tokens[:, None].tolist()),
        }
    )
    with atomic_path(path) as temporary:
        table.to_parquet(temporary, index=False)


def load_contexts(path: Path) -> Contexts:
    """Read a ``contexts.parquet`` written by :func:`save_contexts` (counts are not stored there)."""
    import pandas as pd

    table = pd.read_parquet(path)
    return Contexts(
        tokens=np.stack([np.asarray(t, dtype=np.int64) for t in table["tokens"]]),
        labels=table["label"].to_numpy(dtype=bool),
        document_ids=table["document_id"].astype(str).tolist(),
        sources=table["source"].astype(str).tolist(),
        offsets=table["offset"].to_numpy(dtype=np.int64),
        next_tokens=table["next_token"].to_numpy(dtype=np.int64),
    )
