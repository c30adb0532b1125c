"""The JSON embedded in every artifact (ONNX metadata_props, TorchScript / pt2 extra file "vqcore.json",
AOTInductor package metadata)."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import Tensor, nn

SCHEMA = "vqcore.export/1"
EXTRA_FILE = "vqcore.json"
METADATA_KEY = "vqcore"


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
    from vqcore.module import get_config
    from vqcore.registry import get_registry

    config = get_config(quantizer)
    if config is not None and config.get("name"):
        return config["name"]
    try:
        return get_registry().name_of(type(quantizer))
    except Exception:  # an unregistered module simply has no method name
        return None


def _jsonable(value):
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


def quantizer_fields(q: nn.Module) -> dict:
    """Method hyper-parameters present on the quantizer (absent ones are left out)."""
    fields = {}
    for name in (
        "dim",
        "codebook_dim",
        "codebook_size",
        "codebook_sizes",
        "num_codebooks",
        "num_quantizers",
        "groups",
        "heads",
        "separate_codebook_per_head",
        "use_cosine_sim",
        "levels",
        "scales",
        "codebook_scale",
        "channel_first",
    ):
        try:
            value = getattr(q, name)
        except Exception:  # properties may raise on odd configurations
            continue
        if value is None or callable(value) and not isinstance(value, Tensor):
            continue
        fields[name] = _jsonable(value)
    layout = getattr(q, "layout", None)
    if layout is not None and hasattr(layout, "kind"):
        fields["layout"] = layout.kind
    return fields


def build(
    module: nn.Module,
    quantizer: nn.Module,
    *,
    graph: str,
    fmt: str,
    input_name: str,
    output_name: str,
    example_in: Tensor,
    example_out: Tensor,
    in_names: dict,
    out_names: dict,
    opset=None,
    parity=None,
) -> dict:
    from vqcore._version import __version__

    def layout_of(t: Tensor, names: dict) -> str:
        return ",".join(names.get(i, str(t.shape[i])) for i in range(t.ndim))

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
            "dtype": str(example_in.dtype).replace("torch.", ""),
            "layout": layout_of(example_in, in_names),
        },
        "output": {
            "name": output_name,
            "dtype": str(example_out.dtype).replace("torch.", ""),
            "layout": layout_of(example_out, out_names),
        },
        "index_dtype": "int64",
        "index_layout": layout_of(
            example_out if graph == "encode" else example_in, out_names if graph == "encode" else in_names
        ),
        "dropped_index": -1,
        "dynamic_axes": sorted(set(in_names.values())),
        "opset": opset,
        "torch_version": torch.__version__,
        "weights_sha256": weights_sha256(module),
        "parity": parity,
    }
    return meta


def dumps(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True)


def flat(meta: dict) -> dict[str, str]:
    """String key/values (AOTInductor metadata, ONNX convenience keys): the JSON under "vqcore" plus
    top-level scalars as strings."""
    out = {METADATA_KEY: dumps(meta)}
    for key, value in meta.items():
        if isinstance(value, (str, int, float, bool)):
            out[f"vqcore.{key}"] = str(value)
    return out
