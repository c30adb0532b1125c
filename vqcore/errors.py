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
