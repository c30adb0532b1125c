"""Exception and warning types shared by the core, the plugins and the export layer."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VQCoreWarning(UserWarning):
    """Base category of every warning vqcore emits (filter it with ``warnings.filterwarnings``)."""


class PluginLoadWarning(VQCoreWarning):
    """A third-party plugin failed to load and was skipped."""


class PluginError(RuntimeError):
    """A plugin could not be loaded (raised instead of warning when ``VQCORE_STRICT_PLUGINS=1``)."""


class ConfigurationError(ValueError, AssertionError):
    """An invalid constructor argument or combination of arguments (names what was expected and what came).

    A ``ValueError``. It is also an ``AssertionError`` because vector-quantize-pytorch checks its
    configuration with ``assert``: code written for it that catches ``AssertionError`` keeps working
    after the import changes. This is the one rule for drop-in compatibility of errors: a vqcore error
    derives from ``ValueError`` (or ``TypeError``) AND from the type the reference raises for the same
    mistake (:class:`ConfigurationRuntimeError` where the reference raises ``RuntimeError``).
    """


class ConfigurationRuntimeError(ConfigurationError, RuntimeError):
    """A :class:`ConfigurationError` the reference reports as ``RuntimeError`` (so catchable as either)."""


class DuplicateNameError(ValueError):
    """Two plugins registered the same name."""


class UnknownNameError(KeyError):
    """A name that no plugin registered; the message carries close matches."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind, self.name = kind, name
        self.suggestions = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(s) for s in self.suggestions)}?" if self.suggestions else ""
        super().__init__(f"unknown {kind} {name!r}{hint} (`vqcore list` shows the registered names)")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class MissingArgumentsError(TypeError):
    """A quantizer was created without arguments its constructor requires; ``missing`` names them."""

    def __init__(self, quantizer: str, missing: Iterable[str]):
        self.quantizer, self.missing = quantizer, list(missing)
        super().__init__(f"quantizer {quantizer!r} is missing required arguments: {', '.join(self.missing)}")


class CheckpointError(ValueError):
    """A file :func:`vqcore.load` cannot load: not a safetensors file, truncated, not a vqcore checkpoint,
    an unreadable config, or tensors that are not the ones the config builds (missing, unexpected, another
    shape or dtype). The message names the file and what is wrong."""


class ConfigVersionError(CheckpointError):
    """A checkpoint's config version is one the installed plugin cannot read.

    ``method`` is the registry name; ``saved`` the version in the checkpoint; ``installed`` the version
    the installed plugin builds.
    """

    def __init__(self, method: str, saved: object, installed: int):
        self.method, self.saved, self.installed = method, saved, installed
        if isinstance(saved, int) and saved > installed:
            hint = "the checkpoint is newer than the installed plugin: upgrade the plugin that provides it"
        elif isinstance(saved, int) and saved >= 1:
            hint = f"the installed plugin declares no upgrade from version {saved} (upgrade_config)"
        else:
            hint = "a config version is a positive int"
        super().__init__(
            f"checkpoint of quantizer {method!r} has config version {saved!r}, the installed plugin "
            f"builds version {installed}: {hint}"
        )
