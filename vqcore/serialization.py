"""``vqcore.save`` / ``vqcore.load``: a single safetensors file holding the weights and the config.

The config (registry name, config version, constructor kwargs; see :mod:`vqcore.module`) goes in the
safetensors metadata as JSON, so a checkpoint is rebuilt through the registry: checkpoints of plugin
quantizers load wherever the plugin is installed.

Formats: ``vqcore.checkpoint/2`` records every constructor argument (defaults included) and the
method's config version; ``vqcore.checkpoint/1`` files (the keyword arguments as passed, no version)
still load, as config version 1.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from vqcore._version import __version__
from vqcore.errors import ConfigVersionError
from vqcore.module import config_version_of, get_config
from vqcore.registry import get_registry

FORMAT = "vqcore.checkpoint/2"
FORMAT_V1 = "vqcore.checkpoint/1"
READABLE_FORMATS = (FORMAT, FORMAT_V1)


def quantizer_config(quantizer: torch.nn.Module) -> dict[str, Any]:
    """``{"name", "version", "kwargs"}`` of a quantizer built by vqcore.create or a vqcore class."""
    config = get_config(quantizer)
    if config is None:
        raise ValueError(
            f"{type(quantizer).__name__} does not record how it was built; "
            "create it with vqcore.create(name, ...)"
        )
    if config["kwargs"] is None:
        raise ValueError(
            f"{type(quantizer).__name__} was built with values through *args, which a config cannot "
            "record; pass every constructor argument by keyword"
        )
    if config["name"] is None:
        config["name"] = get_registry().name_of(type(quantizer))
        if config["name"] is None:
            raise ValueError(
                f"{type(quantizer).__name__} is not registered under any name; register its plugin first"
            )
    try:
        json.dumps(config["kwargs"])
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"constructor arguments of {config['name']!r} must be JSON-serialisable to save: {err}"
        ) from None
    return config


def save(quantizer: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write ``quantizer``'s config and weights (state_dict) to ``path`` (safetensors).

    The config records every constructor argument, defaults included, and the method's config version;
    arguments a constructor forwards through ``**kwargs`` (ResidualVQ's options for its VectorQuantize
    layers) are recorded as passed, without the receiving constructor's defaults.
    The file gets the mode a newly created file usually gets (``0o666`` less the process umask, e.g.
    0644), not the owner-only 0600 that safetensors writes.
    """
    config = quantizer_config(quantizer)
    metadata = {"format": FORMAT, "vqcore_version": __version__, "config": json.dumps(config)}
    path = os.fspath(path)
    save_model(quantizer, path, metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """Rebuild the quantizer saved at ``path`` through the registry, load its weights, and return it in
    eval mode (call ``.train()`` to fine-tune it).

    Raises :class:`~vqcore.errors.ConfigVersionError` when the checkpoint's config version is one the
    installed plugin cannot read: newer than the one it builds, or older with no
    ``upgrade_config`` path (:meth:`vqcore.module.QuantizerModule.upgrade_config`).
    """
    from vqcore.api import create

    path = os.fspath(path)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    fmt = metadata.get("format")
    if fmt not in READABLE_FORMATS:
        raise ValueError(
            f"{path} is not a vqcore checkpoint (metadata format {fmt!r}; "
            f"expected one of {', '.join(READABLE_FORMATS)})"
        )
    config = json.loads(metadata["config"])
    name, kwargs = config["name"], config["kwargs"]
    saved_version = config.get("version", 1) if fmt == FORMAT else 1
    entry = get_registry().get_entry(name, "quantizer")
    installed_version = config_version_of(entry.factory)
    if saved_version != installed_version:
        kwargs = _upgraded(entry.factory, entry.name, kwargs, saved_version, installed_version)
    quantizer = create(name, **kwargs)
    load_model(quantizer, path, strict=True, device=str(device))
    return quantizer.to(device).eval()


def _upgraded(factory, name: str, kwargs: dict, saved: object, installed: int) -> dict[str, Any]:
    """``kwargs`` saved at config version ``saved`` as the factory's current version's kwargs."""
    upgrade = getattr(factory, "upgrade_config", None)
    if not isinstance(saved, int) or isinstance(saved, bool) or not 1 <= saved < installed or upgrade is None:
        raise ConfigVersionError(name, saved, installed)
    upgraded = upgrade(dict(kwargs), saved)
    if upgraded is None:
        raise ConfigVersionError(name, saved, installed)
    if not isinstance(upgraded, dict):
        raise TypeError(
            f"{getattr(factory, '__qualname__', factory)}.upgrade_config must return a dict of constructor "
            f"kwargs (or None for an unknown version), got {type(upgraded).__name__}"
        )
    return upgraded


def _umask() -> int:
    """The process umask, read without changing it where the OS tells it (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
