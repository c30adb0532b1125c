"""The registry's public functions: create, list, look up, plug in."""

from __future__ import annotations

from typing import Any

from vqcore.registry import Entry, PluginInfo, get_registry


def create(name: str, /, **kwargs: Any) -> Any:
    """Build the quantizer registered as ``name`` (or one of its aliases) with ``kwargs``.

    The instance is checked against :class:`vqcore.protocols.Quantizer` and records its config
    (registry name, config version and every constructor argument, defaults included; see
    :mod:`vqcore.module`), so :func:`vqcore.save` / :func:`vqcore.load` can rebuild it. Arguments the
    factory requires but ``kwargs`` lacks raise :class:`~vqcore.errors.MissingArgumentsError` (a
    TypeError) naming all of them, and unknown arguments a TypeError naming the quantizer, before the
    factory runs.
    """
    from vqcore.module import bind_keyword_call, config_version_of, factory_signature, set_config
    from vqcore.protocols import check_quantizer_instance

    entry = get_registry().get_entry(name, "quantizer")
    signature = factory_signature(entry.factory)
    arguments = dict(kwargs) if signature is None else bind_keyword_call(signature, kwargs, entry.name)
    quantizer = entry.create(**kwargs)
    check_quantizer_instance(quantizer, origin=f"quantizer {entry.name!r} (plugin {entry.plugin!r})")
    set_config(quantizer, entry.name, arguments, config_version_of(entry.factory))
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
