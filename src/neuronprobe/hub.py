"""Is the Hugging Face hub reachable? Asked before anything tries to download.

Without this check an offline machine spends most of a minute in the hub client's
retries and then fails with a message about HTTP; with it, a user gets one clear line.
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
