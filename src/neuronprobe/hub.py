"""The Hugging Face hub: is it reachable, and which commit does a dataset revision name?

:func:`hub_reachable` is asked before anything tries to download. Without this check an
offline machine spends most of a minute in the hub client's retries and then fails with a
message about HTTP; with it, a user gets one clear line. :func:`dataset_revision` resolves a
dataset's branch or tag to the commit sha that ``run.json`` records.
"""

from __future__ import annotations

import os
import socket
from functools import cache
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}


def offline_requested() -> bool:
    """True when the user asked the Hugging Face libraries to stay offline."""
    return any(
        os.environ.get(var, "").strip().lower() in _TRUE
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )


@cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's endpoint (``HF_ENDPOINT``) opens within ``timeout``."""
    if offline_requested():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def dataset_revision(repo_id: str, revision: str | None = None, timeout: float = 10.0) -> str:
    """The commit sha that ``revision`` of a hub dataset resolves to now (asks the hub).

    Parameters
    ----------
    repo_id:
        The dataset's id on the hub (``allenai/c4``).
    revision:
        A branch, tag or commit sha; None for the default branch.
    timeout:
        Seconds to wait for the hub's answer.

    Returns
    -------
    str
        The 40-hex-digit commit sha.

    Raises
    ------
    Exception
        Whatever ``huggingface_hub`` raises when the hub cannot answer (no such dataset or
        revision, a gated dataset without access, a network error...).
    """
    from huggingface_hub import HfApi

    sha = HfApi().dataset_info(repo_id, revision=revision, timeout=timeout).sha
    if not sha:
        raise ValueError(f"the hub gave no commit sha for dataset {repo_id!r}")
    return str(sha)
