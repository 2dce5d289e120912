"""Probing the Hugging Face hub without loading anything: whether it is switched off or reachable (within
seconds, even when DNS hangs), and whether a transformers or timm model is already in the local cache.
"""
from __future__ import annotations

import importlib.util
import os
import threading

__all__ = ["HUB_TIMEOUT_S", "hub_offline_flag", "hub_reachable", "hf_cached", "is_timm_name", "timm_cached",
           "hf_file_cached"]

HUB_TIMEOUT_S = 3.0


def hub_offline_flag() -> bool:
    """Whether the hub is switched off (``HF_HUB_OFFLINE``, or huggingface_hub's own setting)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """True if the hub endpoint answers an HTTPS request within ``timeout`` s (even if DNS hangs)."""
    import urllib.error
    import urllib.request
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    result: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result.append(True)
        except urllib.error.HTTPError:  # the server answered, with an error status: reachable
            result.append(True)
        except Exception:  # DNS failure, refused, TLS intercepted, timeout, ...
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def hf_cached(repo_id: str) -> bool:
    """Whether the hub model ``repo_id`` is in the local cache (its ``config.json``)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # invalid repo id etc.
        return False


def is_timm_name(name: str) -> bool:
    """Whether ``name`` is a timm model name (``hf-hub:``/``timm/`` ids, or one timm knows)."""
    if name.startswith("hf-hub:") or name.startswith("timm/"):
        return True
    if importlib.util.find_spec("timm") is None:
        return False
    import timm
    return timm.is_model(name.split(".", 1)[0])


def timm_cached(name: str) -> bool:
    """Whether the timm model ``name``'s pretrained weights are in the local hub cache."""
    try:
        import timm
        repo = name.split(":", 1)[1] if name.startswith("hf-hub:") else \
            (timm.models.get_pretrained_cfg(name) or {}).hf_hub_id
        return bool(repo) and any(hf_file_cached(repo, f) for f in ("model.safetensors", "pytorch_model.bin"))
    except Exception:
        return False


def hf_file_cached(repo_id: str, filename: str) -> bool:
    """Whether ``filename`` of the hub repository ``repo_id`` is in the local cache."""
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo_id, filename), str)
