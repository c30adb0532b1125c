"""The JSON embedded in every artifact (ONNX metadata_props, TorchScript / pt2 extra file "vqcore.json",
AOTInductor package metadata).

Two parts: what vqcore writes about the artifact (schema, graph, format, input / output names, dtypes
and layouts, dynamic axes, versions, weights hash, parity summary) and what the artifact's quantizer
declares through the protocol (:func:`quantizer_fields`: the Quantizer fields, its saved config, and
``export_metadata()`` where it has one).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import Tensor, nn

from vqcore.module import get_config
from vqcore.protocols import SupportsExportMetadata

SCHEMA = "vqcore.export/1"
EXTRA_FILE = "vqcore.json"
METADATA_KEY = "vqcore"
# the keys vqcore writes itself (about the artifact, and the quantizer's config); a quantizer's
# export_metadata() may not set them
RESERVED_KEYS = (
    "schema",
    "vqcore_version",
    "method",
    "class",
    "module",
    "graph",
    "format",
    "input",
    "output",
    "index_dtype",
    "float_dtype",
    "outputs",
    "index_layout",
    "max_sizes",
    "delegate",
    "dropped_index",
    "dynamic_axes",
    "opset",
    "torch_version",
    "weights_sha256",
    "parity",
    "config",
)


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the state_dict (sorted keys, dtype, shape and bytes of every tensor)."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        if not isinstance(value, Tensor):
            continue
        t = value.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def method_name(quantizer: nn.Module) -> str | None:
    """The registry name the quantizer was built under (its config), else its class's registered name."""
    from vqcore.registry import get_registry

    config = get_config(quantizer)
    if config is not None and config.get("name"):
        return config["name"]
    try:
        return get_registry().name_of(type(quantizer))
    except Exception:  # an unregistered module simply has no method name
        return None


def _jsonable(value: Any, key: str) -> Any:
    """``value`` as JSON types (tensors as lists, tuples as lists); a TypeError names ``key`` otherwise."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, key) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    raise TypeError(
        f"export metadata {key!r} must be JSON-serialisable (numbers, strings, lists, dicts, tensors), "
        f"got {type(value).__name__}"
    )


def quantizer_fields(quantizer: nn.Module) -> dict[str, Any]:
    """What an artifact records about its quantizer.

    - ``dim``, ``codebook_size``, ``num_codebooks`` (:class:`vqcore.protocols.Quantizer`);
    - ``config``: the saved config (``{"name", "version", "kwargs"}``, see :mod:`vqcore.module`) when the
      quantizer records one whose arguments are JSON-serialisable;
    - everything ``quantizer.export_metadata()`` returns
      (:class:`vqcore.protocols.SupportsExportMetadata`), which may refine the three protocol fields but
      not the keys vqcore writes itself (:data:`RESERVED_KEYS`).
    """
    fields: dict[str, Any] = {}
    for name in ("dim", "codebook_size", "num_codebooks"):
        value = getattr(quantizer, name, None)
        if value is not None:
            fields[name] = _jsonable(value, name)
    config = get_config(quantizer)
    if config is not None and config["kwargs"] is not None:
        try:
            kwargs = json.loads(json.dumps(config["kwargs"]))
        except (TypeError, ValueError):  # built from objects (a codebook instance, ...): no config to show
            kwargs = None
        if kwargs is not None:
            fields["config"] = {
                "name": method_name(quantizer),
                "version": config["version"],
                "kwargs": kwargs,
            }
    if isinstance(quantizer, SupportsExportMetadata):
        declared = quantizer.export_metadata()
        origin = f"{type(quantizer).__name__}.export_metadata()"
        if not isinstance(declared, dict) or not all(isinstance(k, str) for k in declared):
            raise TypeError(f"{origin} must return a dict with str keys, got {type(declared).__name__}")
        reserved = sorted(set(declared) & set(RESERVED_KEYS))
        if reserved:
            raise ValueError(f"{origin} returned keys that vqcore writes itself: {reserved}")
        fields.update({key: _jsonable(value, key) for key, value in declared.items()})
    return fields


def build(
    module: nn.Module,
    quantizer: nn.Module,
    *,
    graph: str,
    fmt: str,
    input_name: str,
    output_names: list[str],
    example_in: Tensor,
    example_outs: tuple[Tensor, ...],
    in_names: dict[int, str],
    out_names: dict[int, str],
    index_names: dict[int, str],
    index_dtype: torch.dtype = torch.int64,
    opset: int | None = None,
    parity: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata of one artifact: what vqcore writes about it and :func:`quantizer_fields`.

    ``out_names`` names the dynamic axes of the first output, ``index_names`` those of the indices (the
    output of encode and quantize graphs, the input of decode graphs). ``outputs`` lists every output;
    ``output`` is the first one."""
    from vqcore._version import __version__

    def layout_of(t: Tensor, names: dict[int, str]) -> str:
        return ",".join(names.get(i, str(t.shape[i])) for i in range(t.ndim))

    def dtype_name(dtype: torch.dtype) -> str:
        return str(dtype).replace("torch.", "")

    outputs = [
        {
            "name": name,
            "dtype": dtype_name(t.dtype),
            "layout": layout_of(t, out_names if k == 0 else index_names),
        }
        for k, (name, t) in enumerate(zip(output_names, example_outs))
    ]
    index_example = example_in if graph == "decode" else example_outs[0 if graph == "encode" else 1]
    floats = [t for t in (example_in, *example_outs) if t.is_floating_point()]
    meta = {
        "schema": SCHEMA,
        "vqcore_version": __version__,
        "method": method_name(quantizer),
        "class": type(quantizer).__name__,
        "module": type(module).__name__,
        "graph": graph,
        "format": fmt,
        **quantizer_fields(quantizer),
        "input": {
            "name": input_name,
            "dtype": dtype_name(example_in.dtype),
            "layout": layout_of(example_in, in_names),
        },
        "output": outputs[0],
        "outputs": outputs,
        "index_dtype": dtype_name(index_dtype),
        "float_dtype": dtype_name(floats[0].dtype) if floats else None,
        "index_layout": layout_of(index_example, in_names if graph == "decode" else index_names),
        "dropped_index": -1,
        "dynamic_axes": sorted(set(in_names.values())),
        "opset": opset,
        "torch_version": torch.__version__,
        "weights_sha256": weights_sha256(module),
        "parity": parity,
        **(extra or {}),
    }
    return meta


def dumps(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True)


def flat(meta: dict[str, Any]) -> dict[str, str]:
    """String key/values (AOTInductor metadata, ONNX convenience keys): the JSON under "vqcore" plus
    top-level scalars as strings."""
    out = {METADATA_KEY: dumps(meta)}
    for key, value in meta.items():
        if isinstance(value, (str, int, float, bool)):
            out[f"vqcore.{key}"] = str(value)
    return out
