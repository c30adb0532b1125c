"""Export of quantizer inference paths (ONNX, TorchScript, torch.export).

Installed as ``vqcore.export`` (pyproject maps this folder); import it by that name only. The writers
arrive with the export issue; today every built-in quantizer's ``encode``/``decode`` already passes
``torch.export.export(strict=False)`` with dynamic batch and sequence axes, which
:func:`vqcore.testing.check_quantizer` verifies.
"""
