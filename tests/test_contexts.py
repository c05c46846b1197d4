"""Stage 2: the contexts are exactly the notebook's, balanced with the run's seed."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from notebook import notebook_scan

from neuronprobe.contexts import (
    Contrast,
    balance_contexts,
    collect_contexts,
    load_contexts,
    resolve_contrast,
    save_contexts,
    scan_contexts,
)
from neuronprobe.errors import NeuronprobeError
from neuronprobe.text import Document, open_corpus


@pytest.fixture(scope="module")
def review_documents() -> list[Document]:
    return list(itertools.islice(open_corpus("movie-reviews").documents(), 3000))


@pytest.mark.parametrize("tokenizer_name", ["gpt2", "smollm2"])
def test_scan_returns_exactly_the_notebook_contexts(
    tokenizer_name: str,
    review_documents: list[Document],
    gpt2_tok: Any,
    request: pytest.FixtureRequest,
) -> None:
    tokenizer = (
        gpt2_tok if tokenizer_name == "gpt2" else request.getfixturevalue("smollm2").tokenizer
    )
    documents = review_documents[:1500]
    can, cant, scanned = notebook_scan([d.text for d in documents], tokenizer)
    scan = scan_contexts(
        documents, tokenizer, min_per_class=10**9, drop_duplicates=False, progress=False
    )
    assert scan.documents_scanned == scanned == len(documents)
    assert scan.negative.tokens == can
    assert scan.positive.tokens == cant
    assert len(cant) > 100  # the comparison covers a real number of contexts
    assert len(can) > 200


def test_scan_stops_where_the_notebook_stops(
    review_documents: list[Document], gpt2_tok: Any
) -> None:
    can, cant, scanned = notebook_scan(
        [d.text for d in review_documents], gpt2_tok, stop=lambda can, cant: min(can, cant) >= 40
    )
    scan = scan_contexts(
        review_documents, gpt2_tok, min_per_class=40, drop_duplicates=False, progress=False
    )
    assert scan.documents_scanned == scanned < len(review_documents)
    assert scan.negative.tokens == can and scan.positive.tokens == cant
    assert min(len(scan.positive), len(scan.negative)) >= 40


def test_contexts_end_in_the_target_and_labels_match_the_next_token(
    review_documents: list[Document], gpt2_tok: Any
) -> None:
    contexts = collect_contexts(
        review_documents, gpt2_tok, min_per_class=50, seed=1, progress=False
    )
    assert contexts.tokens.shape[1] == 11
    assert (contexts.tokens[:, -1] == 460).all()  # " can"
    assert ((contexts.next_tokens == 470) == contexts.labels).all()  # "'t"
    assert contexts.labels.sum() * 2 == len(contexts)
    assert not contexts.labels[: len(contexts) // 2].any()  # negatives first, as the notebook
    by_id = {d.id: d for d in review_documents}
    for row in range(len(contexts)):
        document = by_id[contexts.document_ids[row]]
        assert contexts.sources[row] == document.source == contexts.document_ids[row].split(":")[0]
        end = contexts.offsets[row] + len(" can")
        assert document.text[contexts.offsets[row] : end] == " can"
        # A collected target always ends a pre-token, so the text up to it tokenizes as the
        # whole document does there.
        assert gpt2_tok.encode(document.text[:end])[-11:] == contexts.tokens[row].tolist()


def test_balancing_is_seeded_and_samples_without_replacement(
    review_documents: list[Document], gpt2_tok: Any
) -> None:
    scan = scan_contexts(review_documents, gpt2_tok, min_per_class=60, progress=False)
    assert len(scan.negative) > len(scan.positive)  # "can" is the commoner class
    first = balance_contexts(scan, seed=7)
    again = balance_contexts(scan, seed=7)
    other = balance_contexts(scan, seed=8)
    per_class = len(scan.positive)
    assert first.counts["kept_per_class"] == per_class
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert not np.array_equal(first.tokens[:per_class], other.tokens[:per_class])
    # The smaller class is kept whole; the larger one is a subset without repeats, in corpus order.
    assert first.tokens[per_class:].tolist() == scan.positive.tokens
    kept = list(
        zip(first.document_ids[:per_class], first.offsets[:per_class].tolist(), strict=True)
    )
    found = list(zip(scan.negative.document_ids, scan.negative.offsets, strict=True))
    assert len(set(kept)) == per_class
    assert [found.index(k) for k in kept] == sorted(found.index(k) for k in kept)


def test_multi_token_target_is_a_clear_error(gpt2_tok: Any) -> None:
    message = r"' neuroscientist' is 3 tokens .*\[' neuro', 'scient', 'ist'\]"
    with pytest.raises(NeuronprobeError, match=message):
        resolve_contrast(Contrast(target=" neuroscientist"), gpt2_tok)


def test_multi_token_followers_match_as_sequences(gpt2_tok: Any) -> None:
    contrast = Contrast(target=" can", positive_followers=(" not be",), excluded_followers=())
    ids = resolve_contrast(contrast, gpt2_tok)
    assert ids.positive_sequences == (tuple(gpt2_tok.encode(" not be")),)
    text = "one two three four five six seven eight nine ten it can not be done, it can not go"
    scan = scan_contexts([Document("d", text)], gpt2_tok, contrast, min_per_class=1, progress=False)
    assert len(scan.positive) == 1  # "can not be"
    assert len(scan.negative) == 1  # "can not go": " not" is space-initial and not excluded here


def test_corpus_too_small_is_a_clear_error(gpt2_tok: Any) -> None:
    documents = [Document("d", "a b c d e f g h i j k I can't go and I can go")]
    with pytest.raises(NeuronprobeError, match="--min-per-class 5"):
        collect_contexts(documents, gpt2_tok, min_per_class=5, progress=False)


def test_contexts_round_trip_through_parquet(
    tmp_path: Path, review_documents: list[Document], gpt2_tok: Any
) -> None:
    contexts = collect_contexts(review_documents, gpt2_tok, min_per_class=20, progress=False)
    path = tmp_path / "contexts.parquet"
    save_contexts(contexts, path, gpt2_tok, Contrast())
    loaded = load_contexts(path)
    np.testing.assert_array_equal(loaded.tokens, contexts.tokens)
    np.testing.assert_array_equal(loaded.labels, contexts.labels)
    assert loaded.document_ids == contexts.document_ids
    import pandas as pd

    table = pd.read_parquet(path)
    assert table["text"].str.endswith(" can").all()
    assert set(table["class"]) == {"can", "can't"}
    assert (table.loc[table["label"], "next_text"] == "'t").all()


def test_duplicates_are_dropped_and_counted(gpt2_tok: Any) -> None:
    review = "one two three four five six seven eight nine ten: I can't, and you can go."
    documents = [Document(f"d{i}", review, "s") for i in range(3)]
    kept = scan_contexts(documents, gpt2_tok, min_per_class=10, progress=False)
    assert (len(kept.positive), kept.positive.duplicates) == (1, 2)
    assert (len(kept.negative), kept.negative.duplicates) == (1, 2)
    everything = scan_contexts(
        documents, gpt2_tok, min_per_class=10, drop_duplicates=False, progress=False
    )
    assert (len(everything.positive), everything.positive.duplicates) == (3, 0)


def test_curly_apostrophes_count_when_normalised_and_are_reported(gpt2_tok: Any) -> None:
    prefix = "one two three four five six seven eight nine ten eleven"
    documents = [
        Document("a", f"{prefix} I can\u2019t do it"),
        Document("b", f"{prefix} we can't do it"),
        Document("c", f"{prefix} they can go"),
    ]
    plain = scan_contexts(documents, gpt2_tok, min_per_class=10, progress=False)
    assert len(plain.positive) == 1 and plain.spellings == {"'t": 1}
    normalised = scan_contexts(
        documents, gpt2_tok, min_per_class=10, normalize_apostrophes=True, progress=False
    )
    assert len(normalised.positive) == 2
    assert normalised.spellings == {"\u2019t": 1, "'t": 1}
    contexts = balance_contexts(normalised)
    assert contexts.counts["positive_spellings"] == {"\u2019t": 1, "'t": 1}


# Pieces of text that meet every case of the rule: the target with and without its follower,
# excluded followers, apostrophe variants, the target glued to other words, punctuation,
# digits, line breaks and long runs of spaces (where byte-level BPE splits differently).
_PIECES = [
    " can",
    " can't",
    " can’t",
    " can 't",
    "can",
    "'t",
    " cannot",
    " can of",
    " can in",
    " can not",
    " can be",
    " can,",
    " can.",
    " Can",
    " scan",
    " can't.",
    " I",
    " you",
    " really",
    " do",
    " it",
    " 42",
    "!",
    "\n",
    "\n\n",
    "   ",
    " ",
    "é",
    " 😀",
    " the",
    " pecan",
    "'s",
]


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.lists(st.sampled_from(_PIECES), min_size=0, max_size=80).map("".join),
        min_size=1,
        max_size=6,
    )
)
def test_scanner_properties_on_generated_text(gpt2_tok: Any, texts: list[str]) -> None:
    """Any text: the scan equals the notebook's loop, every context has the configured length
    and ends with the target, and its label agrees with the token that follows it."""
    contrast = Contrast()
    documents = [Document(id=f"doc:{i}", text=text) for i, text in enumerate(texts)]
    scan = scan_contexts(
        documents, gpt2_tok, contrast, min_per_class=10**9, drop_duplicates=False, progress=False
    )
    can, cant, scanned = notebook_scan(texts, gpt2_tok)
    assert scan.documents_scanned == scanned == len(texts)
    assert scan.negative.tokens == can and scan.positive.tokens == cant
    target = gpt2_tok.encode(contrast.target)[0]
    excluded = {gpt2_tok.encode(word)[0] for word in contrast.excluded_followers}
    for found, positive in ((scan.positive, True), (scan.negative, False)):
        for tokens, following in zip(found.tokens, found.next_tokens, strict=True):
            assert len(tokens) == contrast.context_length + 1
            assert tokens[-1] == target
            if positive:
                assert following == gpt2_tok.encode("'t")[0]
            else:
                assert following not in excluded
                assert gpt2_tok.decode([following]).startswith(" ")
