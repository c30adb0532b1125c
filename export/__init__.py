"""Export of quantizer inference paths: ONNX (dynamo), TorchScript (trace) and torch.export / AOTInductor.

Installed as ``vqcore.export`` (pyproject maps this folder); import it by that name only::

    from vqcore.export import to_onnx
    to_onnx(quantizer, "vq_encode.onnx", graph="encode", example=torch.randn(2, 16, 64))

- ``graph="encode"``: features -> int64 indices; ``graph="decode"``: indices -> vectors (after
  project_out; -1 indices decode to zero where the method allows dropped layers); ``graph="quantize"``:
  features -> ``(vectors, indices)`` in one graph.
- ``index_dtype=torch.int32`` (indices as int32, for engines without int64) and
  ``float_dtype=torch.float16`` (a half-precision variant, its distance from float32 reported) on every
  writer: see :mod:`vqcore.export.writers`.
- Formats: ONNX (:func:`to_onnx`), frozen TorchScript (:func:`to_torchscript`), torch.export programs and
  AOTInductor packages (:func:`to_pt2`), ExecuTorch programs (:func:`to_executorch`, with the
  ``executorch`` extra).
- Any module following :class:`vqcore.protocols.Quantizer` exports through its ``encode``/``decode``;
  a plugin may supply its own module through the ``export_module(quantizer, graph)`` hook.
  :class:`Tokenizer` / :class:`Detokenizer` chain a user's encoder / decoder with the quantizer.
- Batch and sequence / spatial axes are dynamic (found by probing the module) and checked after export.
- Parity is verified at export time (``verify=True``): see :mod:`vqcore.export.parity`.
- Metadata (JSON) is embedded in every artifact: :func:`read_metadata`; the quantizer's part comes
  through the protocol (``dim``, ``codebook_size``, ``num_codebooks``, its saved config, and
  ``export_metadata()`` where it has one).
- :func:`default_example_shape`: a features shape for an example when none is given (the CLI's).
"""

from vqcore.export.graphs import (
    DecodeGraph,
    Detokenizer,
    EncodeGraph,
    InterfaceDtypes,
    QuantizeGraph,
    Tokenizer,
    default_example_shape,
    export_module,
)
from vqcore.export.parity import ParityError, ParityReport, PrecisionMeter
from vqcore.export.writers import (
    DEFAULT_OPSET,
    ExportError,
    ExportResult,
    read_metadata,
    to_executorch,
    to_onnx,
    to_pt2,
    to_torchscript,
)

__all__ = [
    "DEFAULT_OPSET",
    "DecodeGraph",
    "Detokenizer",
    "EncodeGraph",
    "ExportError",
    "ExportResult",
    "InterfaceDtypes",
    "ParityError",
    "ParityReport",
    "PrecisionMeter",
    "QuantizeGraph",
    "Tokenizer",
    "default_example_shape",
    "export_module",
    "read_metadata",
    "to_executorch",
    "to_onnx",
    "to_pt2",
    "to_torchscript",
]
