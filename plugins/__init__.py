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
    "vqcore.plugins.residual_fsq",
    "vqcore.plugins.fsp",
    "vqcore.plugins.lfq",
    "vqcore.plugins.residual_lfq",
    "vqcore.plugins.evo_lfq",
    "vqcore.plugins.binary_mapper",
    "vqcore.plugins.latent",
    "vqcore.plugins.sim_vq",
    "vqcore.plugins.residual_sim_vq",
    "vqcore.plugins.hierarchical_vq",
    "vqcore.plugins.reference_vq",
    "vqcore.plugins.reference_scalar",
)
