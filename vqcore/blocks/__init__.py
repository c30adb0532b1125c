"""Building blocks shared by the methods (layer 1 of docs/architecture.md): nearest-code search,
k-means, per-code statistics, codebooks, losses, estimators, residual stacks, shape packing,
projections, precision, validation, distributed helpers, LFQ's entropies and the mixed-radix grids.

Import the module you need (``from vqcore.blocks.codebooks import EMACodebook``); this package
re-exports nothing, so ``import vqcore.blocks`` stays light.
"""
