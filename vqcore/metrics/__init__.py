"""Codebook health: exact usage, perplexity, dead codes and quantization error of any quantizer.

``CodebookMonitor(quantizer)`` counts the codes of every forward and ``encode`` call on the device (no
host synchronisation per step, sums over torch.distributed ranks when read) and reports them as a flat
dict for a logger, a text table or a PNG. See :mod:`vqcore.metrics.monitor`.
"""

from vqcore.metrics.display import report_key
from vqcore.metrics.monitor import BookInfo, CodebookMonitor, split_output

__all__ = ["BookInfo", "CodebookMonitor", "report_key", "split_output"]
