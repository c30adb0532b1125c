"""Built-in plugins: one module per method family, each registering itself through hookimpls.

Installed as ``vqcore.plugins`` (pyproject maps this folder); import it by that name only.
"""

# Registered in this order, before any third-party entry point.
BUILTIN_PLUGINS = (
    "vqcore.plugins.blocks",
    "vqcore.plugins.vq",
    "vqcore.plugins.rvq",
    "vqcore.plugins.rpq",
    "vqcore.plugins.fsq",
    "vqcore.plugins.lfq",
    "vqcore.plugins.latent",
    "vqcore.plugins.reference_vq",
    "vqcore.plugins.reference_scalar",
)
