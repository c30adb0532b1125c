"""vqcore: vector quantizers for PyTorch as a small core plus pluggy plugins.

``import vqcore`` stays light: plugins load on first registry use and the quantizer classes below
resolve lazily (PEP 562).
"""

from __future__ import annotations

import importlib

from vqcore._version import __version__
from vqcore.hookspecs import hookimpl

# name -> "module:attribute", resolved on first access
_LAZY = {
    "create": "vqcore.api:create",
    "list_quantizers": "vqcore.api:list_quantizers",
    "get_entry": "vqcore.api:get_entry",
    "plugins_info": "vqcore.api:plugins_info",
    "register_plugin": "vqcore.api:register_plugin",
    "save": "vqcore.serialization:save",
    "load": "vqcore.serialization:load",
    "VectorQuantize": "vqcore.plugins.vq:VectorQuantize",
    "ResidualVQ": "vqcore.plugins.rvq:ResidualVQ",
    "GroupedResidualVQ": "vqcore.plugins.rvq:GroupedResidualVQ",
    "RandomProjectionQuantizer": "vqcore.plugins.rpq:RandomProjectionQuantizer",
    "FSQ": "vqcore.plugins.fsq:FSQ",
    "ResidualFSQ": "vqcore.plugins.residual_fsq:ResidualFSQ",
    "GroupedResidualFSQ": "vqcore.plugins.residual_fsq:GroupedResidualFSQ",
    "FSP": "vqcore.plugins.fsp:FSP",
    "LFQ": "vqcore.plugins.lfq:LFQ",
    "ResidualLFQ": "vqcore.plugins.residual_lfq:ResidualLFQ",
    "GroupedResidualLFQ": "vqcore.plugins.residual_lfq:GroupedResidualLFQ",
    "EvoLFQ": "vqcore.plugins.evo_lfq:EvoLFQ",
    "BinaryMapper": "vqcore.plugins.binary_mapper:BinaryMapper",
    "Sequential": "vqcore.blocks.sequential:Sequential",
    "LatentQuantize": "vqcore.plugins.latent:LatentQuantize",
    "SimVQ": "vqcore.plugins.sim_vq:SimVQ",
    "ResidualSimVQ": "vqcore.plugins.residual_sim_vq:ResidualSimVQ",
    "HierarchicalVQ": "vqcore.plugins.hierarchical_vq:HierarchicalVQ",
    "CodebookMonitor": "vqcore.metrics:CodebookMonitor",
    "UnknownNameError": "vqcore.errors:UnknownNameError",
    "DuplicateNameError": "vqcore.errors:DuplicateNameError",
    "VQCoreWarning": "vqcore.errors:VQCoreWarning",
    "CheckpointError": "vqcore.errors:CheckpointError",
    "ConfigVersionError": "vqcore.errors:ConfigVersionError",
    "ConfigurationError": "vqcore.errors:ConfigurationError",
    "ConfigurationRuntimeError": "vqcore.errors:ConfigurationRuntimeError",
    "MissingArgumentsError": "vqcore.errors:MissingArgumentsError",
}

__all__ = ["__version__", "hookimpl", *_LAZY]


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'vqcore' has no attribute {name!r}")
    module_name, attribute = target.split(":")
    value = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
