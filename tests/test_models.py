"""Model loading: the bundled SmolLM2, local save_pretrained folders, and clear errors offline."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from neuronprobe.assets import file_sha256
from neuronprobe.errors import NeuronprobeError
from neuronprobe.hub import hub_reachable
from neuronprobe.models import load_model, resolve_device, smollm2_gguf_path


def test_smollm2_is_the_real_model_and_knows_the_contrast(smollm2: Any) -> None:
    tokenizer, model = smollm2.tokenizer, smollm2.model
    assert tokenizer.encode(" can", add_special_tokens=False) == [416]
    assert tokenizer.encode(" can't", add_special_tokens=False) == [416, 982]
    assert model.config.num_hidden_layers == 30
    assert model.config.intermediate_size == 1536
    ids = torch.tensor([tokenizer.encode("I really can", add_special_tokens=False)])
    with torch.inference_mode():
        probabilities = model(ids).logits[0, -1].softmax(-1)
    assert probabilities[982].item() > 0.6  # FACTS.md: 0.72 for the GGUF model


def test_smollm2_cache_matches_the_gguf_it_came_from(smollm2: Any) -> None:
    """The cached safetensors copy computes what transformers' own GGUF load computes."""
    from transformers import AutoModelForCausalLM

    from neuronprobe.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor(
        [smollm2.tokenizer.encode("You can't be serious, I can", add_special_tokens=False)]
    )
    with torch.inference_mode():
        expected = reference(ids).logits
        got = smollm2.model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    identity = smollm2.identity
    assert identity["name"] == "smollm2-135m"
    assert len(identity["gguf_sha256"]) == 64
    assert (Path(identity["cache"]) / "model.safetensors").is_file()


def test_local_directory_loads_with_its_tokenizer(tiny_gpt2_dir: Path) -> None:
    loaded = load_model(str(tiny_gpt2_dir), device="cpu")
    assert loaded.tokenizer.encode(" can't") == [460, 470]
    assert loaded.identity["source"] == "local directory"
    assert loaded.identity["model_type"] == "gpt2"
    assert len(loaded.identity["weights_sha256"]) == 64
    assert not loaded.model.training


def test_folder_that_is_not_a_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NeuronprobeError, match="without config.json"):
        load_model(str(tmp_path), device="cpu")


def test_hub_id_offline_is_a_clear_error() -> None:
    hub_reachable.cache_clear()
    with pytest.raises(NeuronprobeError, match=r"'gpt2-medium'.*not reachable.*smollm2-135m"):
        load_model("gpt2-medium", device="cpu")


def test_unavailable_device_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(NeuronprobeError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(NeuronprobeError, match="not a torch device"):
        resolve_device("gpu0")
    assert resolve_device("auto").type == "cpu"


def test_a_gguf_file_path_loads_like_the_bundled_alias(smollm2: Any) -> None:
    from neuronprobe.models import smollm2_gguf_path

    loaded = load_model(str(smollm2_gguf_path()), device="cpu")
    assert loaded.identity["gguf_sha256"] == smollm2.identity["gguf_sha256"]
    assert loaded.identity["cache"] == smollm2.identity["cache"]  # one cached copy per file
    first = next(iter(smollm2.model.state_dict().values()))
    torch.testing.assert_close(next(iter(loaded.model.state_dict().values())), first)


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(NeuronprobeError, match=r"is not a GGUF file"):
        load_model(str(fake), device="cpu")
    with pytest.raises(NeuronprobeError, match=r"no such \.gguf file"):
        load_model(str(tmp_path / "missing.gguf"), device="cpu")


def test_dtype_sets_the_weights_and_activations_stay_float32(tiny_gpt2_dir: Path) -> None:
    import numpy as np

    from neuronprobe.activations import extract_activations

    loaded = load_model(str(tiny_gpt2_dir), device="cpu", dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.identity["dtype"] == "bfloat16"
    tokens = np.random.default_rng(0).integers(0, 1000, size=(3, 11))
    half = extract_activations(loaded.model, tokens, progress=False)
    full = extract_activations(
        load_model(str(tiny_gpt2_dir), device="cpu").model, tokens, progress=False
    )
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, rtol=0.1, atol=0.1)  # bfloat16 keeps ~3 digits
    with pytest.raises(NeuronprobeError, match="--dtype 'int8' is not one of"):
        load_model(str(tiny_gpt2_dir), device="cpu", dtype="int8")


def _conversions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("converting ")]


def test_gguf_cache_is_keyed_by_content_so_copies_share_one_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, smollm2: Any
) -> None:
    """A copy of the bundled GGUF under another path and name (another virtual environment)
    is converted once; the bundled file then finds that conversion and converts nothing."""
    monkeypatch.setenv("NEURONPROBE_CACHE", str(tmp_path / "cache"))
    bundled = smollm2_gguf_path()
    sha = file_sha256(bundled)
    assert sha == smollm2.identity["gguf_sha256"]
    copy = tmp_path / "other-venv" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copyfile(bundled, copy)
    models = tmp_path / "cache" / "models"
    directory = models / f"gguf-{sha[:12]}"

    with caplog.at_level(logging.INFO, logger="neuronprobe.models"):
        first = load_model(str(copy), device="cpu")
    assert _conversions(caplog) == [
        f"converting renamed.gguf to a float32 safetensors copy in {directory} (once)"
    ]
    assert first.identity["cache"] == str(directory)
    assert first.identity["gguf_sha256"] == sha
    assert sorted(p.name for p in models.iterdir()) == [directory.name]  # no staging left
    assert (directory / "gguf.sha256").read_text() == sha + "\n"
    weights = directory / "model.safetensors"
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (directory, weights)]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="neuronprobe.models"):
        second = load_model("smollm2-135m", device="cpu")
    assert _conversions(caplog) == []
    assert second.identity["cache"] == str(directory)
    assert second.identity["gguf_sha256"] == sha
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (directory, weights)] == before
    assert sorted(p.name for p in models.iterdir()) == [directory.name]
    # The same conversion as the session's copy (in the default cache), bit for bit.
    expected = smollm2.model.state_dict()
    got = second.model.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_cache_folder_from_another_file_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEURONPROBE_CACHE", str(tmp_path))
    sha = file_sha256(smollm2_gguf_path())
    directory = tmp_path / "models" / f"gguf-{sha[:12]}"
    directory.mkdir(parents=True)
    with pytest.raises(NeuronprobeError, match=r"no gguf\.sha256 in it\); delete that folder") as e:
        load_model("smollm2-135m", device="cpu")
    assert str(e.value) == (
        f"the cached model folder {directory} is not a conversion of {smollm2_gguf_path()} "
        f"(sha256 {sha}; no gguf.sha256 in it); delete that folder and load the model again."
    )
    (directory / "gguf.sha256").write_text("0" * 64 + "\n")
    with pytest.raises(NeuronprobeError, match=f"converted from sha256 {'0' * 64}\\); delete"):
        load_model("smollm2-135m", device="cpu")
