"""The registry's public functions: create, list, look up, plug in."""

from __future__ import annotations

from vqcore.registry import Entry, PluginInfo, get_registry


def create(name: str, /, **kwargs):
    """Build the quantizer registered as ``name`` (or one of its aliases) with ``kwargs``.

    The instance is checked against :class:`vqcore.protocols.Quantizer` and remembers
    ``(name, kwargs)``, so :func:`vqcore.save` / :func:`vqcore.load` can rebuild it.
    """
    from vqcore.module import set_config
    from vqcore.protocols import check_quantizer_instance

    entry = get_registry().get_entry(name, "quantizer")
    quantizer = entry.create(**kwargs)
    check_quantizer_instance(quantizer, origin=f"quantizer {entry.name!r} (plugin {entry.plugin!r})")
    set_config(quantizer, entry.name, kwargs)
    return quantizer


def list_quantizers(pattern: str = "*") -> list[str]:
    """Registered quantizer names matching a glob ``pattern`` (names or aliases), sorted."""
    return [entry.name for entry in get_registry().entries("quantizer", pattern)]


def get_entry(name: str, kind: str = "quantizer") -> Entry:
    """The registry entry (factory, plugin, aliases, summary) for ``name``; ``kind`` is
    quantizer/codebook/loss.
    """
    return get_registry().get_entry(name, kind)


def plugins_info() -> list[PluginInfo]:
    """Every plugin seen: name, version, source, status (ok / failed: reason), hooks and registered names."""
    return get_registry().plugins()


def register_plugin(plugin, name: str | None = None) -> None:
    """Register a plugin object (a module, class or instance with :data:`vqcore.hookimpl` functions)."""
    get_registry().register_plugin(plugin, name)
