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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import Tensor

from vqcore._version import __version__
from vqcore.errors import CheckpointError, ConfigVersionError
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

    Safe on untrusted files: nothing in the file is executed (safetensors holds tensors and a JSON config),
    and nothing is allocated before the config has been checked against the file. The module is first
    built on the meta device (no memory), every tensor it expects is compared with the file's header
    (names, shapes, dtypes), and only then is it built for real and filled. Raises
    :class:`~vqcore.errors.CheckpointError` naming the file and the problem for a file that is not
    safetensors or is truncated, is not a vqcore checkpoint, holds an unreadable config, or holds tensors
    the config does not build; :class:`~vqcore.errors.ConfigVersionError` (a CheckpointError) when the
    config version is one the installed plugin cannot read (newer than the one it builds, or older with
    no ``upgrade_config`` path, :meth:`vqcore.module.QuantizerModule.upgrade_config`).
    """
    from vqcore.api import create

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            header = {
                key: (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                for key in handle.keys()
            }
    except (OSError, SafetensorError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise CheckpointError(
            f"{path} is not a vqcore checkpoint (not a complete safetensors file: {_one_line(err)})"
        ) from None
    fmt = metadata.get("format")
    if fmt not in READABLE_FORMATS:
        raise CheckpointError(
            f"{path} is not a vqcore checkpoint (metadata format {fmt!r}; "
            f"expected one of {', '.join(READABLE_FORMATS)})"
        )
    name, kwargs, saved_version = _read_config(path, metadata, fmt)
    entry = get_registry().get_entry(name, "quantizer")
    installed_version = config_version_of(entry.factory)
    if saved_version != installed_version:
        kwargs = _upgraded(entry.factory, entry.name, kwargs, saved_version, installed_version)
    _check_tensors(path, name, _expected_tensors(path, name, kwargs), header)
    quantizer = create(name, **kwargs)
    try:
        load_model(quantizer, path, strict=True, device=str(device))
    except (OSError, SafetensorError, RuntimeError) as err:  # the data behind the header is cut short
        raise CheckpointError(f"{path}: its tensors cannot be read: {_one_line(err)}") from None
    return quantizer.to(device).eval()


def _read_config(path: str, metadata: dict[str, str], fmt: str) -> tuple[str, dict[str, Any], object]:
    """(registry name, kwargs, config version) from a checkpoint's metadata, checked."""
    try:
        config = json.loads(metadata["config"])
        name, kwargs = config["name"], config["kwargs"]
        if not isinstance(name, str) or not isinstance(kwargs, dict):
            raise TypeError("a name (str) and kwargs (an object) are expected")
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} holds no readable vqcore config: {_one_line(err)}") from None
    return name, kwargs, config.get("version", 1) if fmt == FORMAT else 1


def _expected_tensors(
    path: str, name: str, kwargs: dict[str, Any]
) -> list[tuple[list[str], tuple[int, ...], str]] | None:
    """The tensors the config builds, ``[(keys, shape, safetensors dtype)]``, from a module built on the
    meta device (no memory, whatever sizes the config asks for). ``keys`` are the state_dict names of one
    tensor (a tied tensor has several; the file holds it under one of them). None for a constructor that
    cannot run there (one that reads tensor values): the file is then checked only as it is loaded. A config
    the method refuses (arguments it does not take, values out of range) is a CheckpointError too."""
    from vqcore.api import create

    try:
        with torch.device("meta"):
            module = create(name, **kwargs)
    except RuntimeError as err:
        if "meta" not in str(err):
            raise
        return None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its config does not build {name!r}: {_one_line(err)}") from None
    groups: dict[int, tuple[list[str], Tensor]] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), ([], tensor))[0].append(key)
    return [
        (keys, tuple(t.shape), _SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype))) for keys, t in groups.values()
    ]


def _check_tensors(
    path: str,
    name: str,
    expected: list[tuple[list[str], tuple[int, ...], str]] | None,
    header: dict[str, tuple],
) -> None:
    """Refuse a file whose tensors are not those the config builds, before anything is allocated."""
    if expected is None:
        return
    known = {key for keys, _, _ in expected for key in keys}
    problems = [f"missing {keys[0]}" for keys, _, _ in expected if not any(k in header for k in keys)]
    problems += [f"unexpected {key}" for key in header if key not in known]
    for keys, shape, dtype in expected:
        for key in keys:
            if key in header and (shape, dtype) != header[key]:
                saved_shape, saved_dtype = header[key]
                problems.append(
                    f"{key}: the config builds {list(shape)} {dtype}, the file holds {list(saved_shape)} "
                    f"{saved_dtype}"
                )
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise CheckpointError(f"{path}: its tensors are not those its config builds ({name!r}): {shown}")


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


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
