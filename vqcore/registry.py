"""The plugin registry: one pluggy PluginManager, loaded lazily on first use.

Built-in plugins (the modules of :mod:`vqcore.plugins`) are registered in code first, then
third-party plugins from the entry-point group ``vqcore``. A plugin that fails to import is skipped
with a :class:`~vqcore.errors.PluginLoadWarning` naming it (fatal when ``VQCORE_STRICT_PLUGINS=1``).
Two plugins registering the same name is an error naming both.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pluggy

from vqcore import hookspecs
from vqcore._version import __version__
from vqcore.errors import DuplicateNameError, PluginError, PluginLoadWarning, UnknownNameError

ENTRY_POINT_GROUP = "vqcore"
KINDS = ("quantizer", "codebook", "loss", "estimator", "converter")
_HOOK_OF_KIND = {
    "quantizer": "register_quantizers",
    "codebook": "register_codebooks",
    "loss": "register_losses",
    "estimator": "register_estimators",
    "converter": "register_converters",
}


@dataclass(frozen=True)
class Entry:
    """One registered name: what it builds and which plugin registered it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    aliases: tuple[str, ...] = ()
    summary: str = ""

    def create(self, **kwargs):
        return self.factory(**kwargs)


@dataclass
class PluginInfo:
    """What ``vqcore plugins`` shows for one plugin."""

    name: str
    version: str
    source: str  # "builtin", "entry point <ep value>" or "register_plugin"
    status: str = "ok"  # "ok" or "failed: <reason>"
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)


class Registry:
    """Names -> factories for quantizers, codebooks and losses, filled by pluggy hooks."""

    def __init__(self, builtin_plugins=None, entry_point_group=ENTRY_POINT_GROUP):
        self._builtin_plugins = None if builtin_plugins is None else tuple(builtin_plugins)
        self._group = entry_point_group
        self._lock = threading.RLock()
        self._loaded = False
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._aliases: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
        self._info: dict[str, PluginInfo] = {}

    # -- loading ---------------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            builtins = self._builtin_plugins
            if builtins is None:
                from vqcore.plugins import BUILTIN_PLUGINS

                builtins = BUILTIN_PLUGINS
            for module_name in builtins:
                module = importlib.import_module(module_name)
                self._add_plugin(module, module_name, version=__version__, source="builtin")
            for ep in _entry_points(self._group):
                self._load_entry_point(ep)

    def _load_entry_point(self, ep) -> None:
        dist = getattr(ep, "dist", None)
        version = getattr(dist, "version", None) or "unknown"
        label = f"{ep.name} ({ep.value})"
        if ep.name in self._info:
            # the same distribution seen twice on sys.path (e.g. an editable install and a build dir)
            return
        try:
            plugin = ep.load()
        except Exception as err:  # any import-time failure of a third-party plugin
            reason = f"{type(err).__name__}: {err}"
            self._info[ep.name] = PluginInfo(ep.name, version, f"entry point {ep.value}", f"failed: {reason}")
            if _strict():
                raise PluginError(f"vqcore plugin {label} failed to load: {reason}") from err
            warnings.warn(
                f"vqcore plugin {label} failed to load and was skipped: {reason} "
                "(set VQCORE_STRICT_PLUGINS=1 to make this an error)",
                PluginLoadWarning,
                stacklevel=3,
            )
            return
        self._add_plugin(plugin, ep.name, version=version, source=f"entry point {ep.value}")

    def _add_plugin(self, plugin, name: str, *, version: str, source: str) -> None:
        if self.pm.is_registered(plugin):
            raise ValueError(f"plugin {name!r} is already registered")
        self.pm.register(plugin, name=name)
        info = PluginInfo(name, version, source)
        self._info[name] = info
        try:
            for kind, hook_name in _HOOK_OF_KIND.items():
                hook = getattr(self.pm.hook, hook_name)
                for impl in hook.get_hookimpls():
                    if impl.plugin is not plugin:
                        continue
                    info.hooks.append(hook_name)
                    impl.function(register=self._registrar(kind, name, info))
        except Exception:
            self._forget(name, plugin)
            raise

    def _forget(self, name: str, plugin) -> None:
        """Undo a half-registered plugin so that a failure leaves the registry as it was."""
        self.pm.unregister(plugin)
        for kind in KINDS:
            for entry_name in [n for n, e in self._entries[kind].items() if e.plugin == name]:
                del self._entries[kind][entry_name]
            for alias in [a for a, n in self._aliases[kind].items() if n not in self._entries[kind]]:
                del self._aliases[kind][alias]
        self._info.pop(name, None)

    def _registrar(self, kind: str, plugin_name: str, info: PluginInfo):
        def register(name: str, factory: Callable[..., Any], *, aliases=(), summary: str = "") -> None:
            if not isinstance(name, str) or not name:
                raise TypeError(
                    f"plugin {plugin_name!r}: a {kind} name must be a non-empty str, got {name!r}"
                )
            if not callable(factory):
                raise TypeError(f"plugin {plugin_name!r}: factory for {kind} {name!r} must be callable")
            aliases = (aliases,) if isinstance(aliases, str) else tuple(aliases)
            for key in (name, *aliases):
                owner = self._owner(kind, key)
                if owner is not None:
                    raise DuplicateNameError(
                        f"{kind} name {key!r} registered by plugin {plugin_name!r} is already "
                        f"registered by plugin {owner!r}"
                    )
            self._entries[kind][name] = Entry(kind, name, factory, plugin_name, aliases, summary)
            for alias in aliases:
                self._aliases[kind][alias] = name
            info.registered.setdefault(kind, []).append(name)

        return register

    def _owner(self, kind: str, key: str) -> str | None:
        canonical = self._aliases[kind].get(key, key)
        entry = self._entries[kind].get(canonical)
        return entry.plugin if entry is not None else None

    # -- public ------------------------------------------------------------------------------------
    def register_plugin(self, plugin, name: str | None = None) -> None:
        """Register a plugin object (module, class or instance with hookimpls) at run time."""
        self._ensure_loaded()
        with self._lock:
            name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
            self._add_plugin(plugin, name, version=_version_of(plugin), source="register_plugin")

    def get_entry(self, name: str, kind: str = "quantizer") -> Entry:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(name, str):
            raise TypeError(f"{kind} name must be a str, got {type(name).__name__}")
        self._ensure_loaded()
        canonical = self._aliases[kind].get(name, name)
        try:
            return self._entries[kind][canonical]
        except KeyError:
            known = list(self._entries[kind]) + list(self._aliases[kind])
            raise UnknownNameError(kind, name, known) from None

    def entries(self, kind: str = "quantizer", pattern: str = "*") -> list[Entry]:
        self._ensure_loaded()
        return [
            entry
            for name, entry in sorted(self._entries[kind].items())
            if fnmatch.fnmatchcase(name, pattern)
            or any(fnmatch.fnmatchcase(a, pattern) for a in entry.aliases)
        ]

    def name_of(self, factory) -> str | None:
        """The registered quantizer name whose factory is ``factory`` (a class), if any."""
        self._ensure_loaded()
        for entry in self._entries["quantizer"].values():
            if entry.factory is factory:
                return entry.name
        return None

    def export_module(self, quantizer: Any, graph: str) -> Any:
        """The first plugin's answer to the ``export_module(quantizer, graph)`` hook, or None."""
        self._ensure_loaded()
        return self.pm.hook.export_module(quantizer=quantizer, graph=graph)

    def plugins(self) -> list[PluginInfo]:
        self._ensure_loaded()
        return list(self._info.values())


def _entry_points(group: str):
    return sorted(metadata.entry_points(group=group), key=lambda ep: ep.name)


def _strict() -> bool:
    return os.environ.get("VQCORE_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes", "on"}


def _version_of(plugin) -> str:
    return str(getattr(plugin, "__version__", None) or "unknown")


_registry: Registry | None = None
_registry_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry."""
    global _registry
    if _registry is None:
        with _registry_lock:
            if _registry is None:
                _registry = Registry()
    return _registry


def reset_registry() -> Registry:
    """Forget every plugin and rediscover them on next use (after installing a plugin at run time)."""
    global _registry
    with _registry_lock:
        _registry = Registry()
    return _registry
