"""``vqcore.save`` / ``vqcore.load``: a single safetensors file holding the weights and the config.

The config (registry name + constructor kwargs, JSON) goes in the safetensors metadata, so a
checkpoint is rebuilt through the registry: checkpoints of plugin quantizers load wherever the
plugin is installed.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from vqcore._version import __version__
from vqcore.module import get_config
from vqcore.registry import get_registry

FORMAT = "vqcore.checkpoint/1"


def quantizer_config(quantizer: torch.nn.Module) -> dict:
    """``{"name", "kwargs"}`` of a quantizer built by vqcore.create or a vqcore class."""
    config = get_config(quantizer)
    if config is None:
        raise ValueError(
            f"{type(quantizer).__name__} does not record how it was built; "
            "create it with vqcore.create(name, ...)"
        )
    if config["name"] is None:
        config["name"] = get_registry().name_of(type(quantizer))
        if config["name"] is None:
            raise ValueError(
                f"{type(quantizer).__name__} is not registered under any name; register its plugin first"
            )
    try:
        json.dumps(config["kwargs"])
    except TypeError as err:
        raise TypeError(
            f"constructor arguments of {config['name']!r} must be JSON-serialisable to save: {err}"
        ) from None
    return config


def save(quantizer: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write ``quantizer``'s config and weights (state_dict) to ``path`` (safetensors)."""
    config = quantizer_config(quantizer)
    metadata = {"format": FORMAT, "vqcore_version": __version__, "config": json.dumps(config)}
    save_model(quantizer, os.fspath(path), metadata=metadata)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the quantizer saved at ``path`` through the registry and load its weights."""
    from vqcore.api import create

    path = os.fspath(path)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vqcore checkpoint (metadata format {metadata.get('format')!r})")
    config = json.loads(metadata["config"])
    quantizer = create(config["name"], **config["kwargs"])
    missing, unexpected = load_model(quantizer, path, strict=True, device=str(device))
    return quantizer.to(device)
