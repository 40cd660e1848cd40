"""Forwards swapped on single modules, and given back: the one mechanism behind the speed path's fused pieces; and the
transformers model under a PEFT wrapper, which the pieces look into."""

from __future__ import annotations

import types
from collections.abc import Callable

from loralab.cpu.catalogue import PLAIN_HEAD_MODELS


def swap_forwards(model, forward: Callable, wanted: Callable) -> int:
    """Give every module of ``model`` for which ``wanted(module)`` holds ``forward`` (bound to it) as its own
    forward; return how many. own_forwards_back gives them their class's back."""
    switched = 0
    for module in model.modules():
        if wanted(module):
            module.forward = types.MethodType(forward, module)
            switched += 1
    return switched


def own_forwards_back(model, patched: Callable) -> None:
    """Give every module of ``model`` whose forward was swapped for the function ``patched`` its class's own back."""
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) is patched:
            del module.forward


def base_model(model):
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def llama_family(model):
    """The transformers model under ``model`` (a PEFT wrapper or not) when it is of a Llama-family type
    (catalogue.PLAIN_HEAD_MODELS), else None."""
    base = base_model(model)
    return base if getattr(base.config, "model_type", None) in PLAIN_HEAD_MODELS else None
