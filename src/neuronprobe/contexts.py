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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    def add(self, tokens: list[int], document: Document, offset: int, next_token: int) -> bool:
        """Keep a context unless it repeats one already kept; say whether it was kept."""
        if self.drop_duplicates:
            key = tuple(tokens)
            if key in self._seen:
                self.duplicates += 1
                return False
            self._seen.add(key)
        self.tokens.append(tokens)
        self.document_ids.append(document.id)
        self.sources.append(document.source)
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
    """

    positive: _Found
    negative: _Found
    documents_scanned: int
    spellings: Counter[str] = field(default_factory=Counter)


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

    from neuronprobe.scanner import Hit, target_hits

    contrast = contrast or Contrast()
    ids = resolve_contrast(contrast, tokenizer)
    width = contrast.context_length
    after = max(len(sequence) for sequence in ids.positive_sequences)
    follower_texts = {seq: tokenizer.decode(list(seq)) for seq in ids.positive_sequences}
    space_initial: dict[int, bool] = {}

    def text_of(document: Document) -> str:
        if normalize_apostrophes:
            return document.text.translate(_TO_ASCII_APOSTROPHE)
        return document.text

    def documents_with_hits() -> Iterator[tuple[Document, list[Hit]]]:
        # Exactly the whole-document tokens' hits, from windows where that is provably the same
        # (see neuronprobe.scanner); documents are handled in batches. Token indices are not
        # needed (the character offset locates a context), which saves most of the work.
        batch: list[Document] = []

        def hits_of(batch: list[Document]) -> list[list[Hit]]:
            texts = [text_of(doc) for doc in batch]
            return target_hits(
                texts, tokenizer, ids.target_id, contrast.target, width, after, with_index=False
            )

        for document in documents:
            batch.append(document)
            if len(batch) >= batch_documents:
                yield from zip(batch, hits_of(batch), strict=True)
                batch = []
        if batch:
            yield from zip(batch, hits_of(batch), strict=True)

    scan = Scan(_Found(drop_duplicates), _Found(drop_duplicates), 0)
    bar = tqdm(desc="scanning documents", unit=" docs", disable=not progress, mininterval=0.5)
    try:
        for document, hits in documents_with_hits():
            if len(scan.positive) >= min_per_class and len(scan.negative) >= min_per_class:
                break
            scan.documents_scanned += 1
            bar.update(1)
            for hit in hits:
                following = hit.following
                next_token = following[0]
                matched = next(
                    (seq for seq in ids.positive_sequences if tuple(following[: len(seq)]) == seq),
                    None,
                )
                if matched is not None:
                    if scan.positive.add(hit.context, document, hit.offset, next_token):
                        scan.spellings[
                            _spelling(document.text, hit.offset, contrast, follower_texts[matched])
                        ] += 1
                elif next_token not in ids.excluded_ids and _space_initial(
                    tokenizer, next_token, space_initial
                ):
                    scan.negative.add(hit.context, document, hit.offset, next_token)
            if hits:
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
    if len(scan.positive) < min_per_class or len(scan.negative) < min_per_class:
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
