"""Hugging Face Hub reachability: fail in seconds, not after minutes of retries, when there is no network.

Without a network, huggingface_hub retries each request with backoff (about 25 s and five warning lines
per file) before transformers or datasets give up. One quick TCP connect to the hub's endpoint decides
instead: when it fails, offline mode is switched on for this process, so models and datasets already in
the local HF cache still load and anything else fails at once with loralab's own one-line error.
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

_checked: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub endpoint (HF_ENDPOINT, default huggingface.co:443) opens."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def why_not_loaded(err: Exception) -> str:
    """A short reason for a failed hub load, for loralab's one-line errors."""
    from huggingface_hub import constants

    if _checked is False:
        return f"{constants.ENDPOINT} is unreachable and it is not in the local cache"
    if constants.HF_HUB_OFFLINE:
        return "offline mode (HF_HUB_OFFLINE) and it is not in the local cache"
    return type(err).__name__


def prepare_hub_access() -> None:
    """Before the first hub request: switch to offline mode (local cache only) when the hub cannot be reached.

    Checked once per process; does nothing when offline mode is already set (HF_HUB_OFFLINE=1).
    """
    global _checked
    from huggingface_hub import constants

    if _checked is not None or constants.HF_HUB_OFFLINE:
        return
    _checked = hub_reachable()
    if not _checked:
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True  # read by huggingface_hub.is_offline_mode(), hence by transformers
        if "datasets" in sys.modules:  # datasets copies the flag at import; later imports read the env var
            sys.modules["datasets"].config.HF_HUB_OFFLINE = True
