"""Base class of the built-in quantizers: records the constructor's keyword arguments.

``vqcore.save`` writes ``(registry name, kwargs)`` next to the weights and ``vqcore.load`` rebuilds the
module through the registry, so every quantizer must know how it was built. Subclasses of
:class:`QuantizerModule` get that for free; third-party quantizers made by :func:`vqcore.create` get
it from ``create``.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

CONFIG_ATTR = "_vqcore_config"


class QuantizerModule(nn.Module):
    """``nn.Module`` that remembers the keyword arguments of its outermost constructor call."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        original = cls.__init__
        signature = inspect.signature(original)

        @functools.wraps(original)
        def __init__(self, *args, **kw):
            if CONFIG_ATTR not in self.__dict__:  # outermost constructor only
                try:
                    bound = signature.bind(self, *args, **kw)
                except TypeError:
                    return original(self, *args, **kw)  # raises Python's own message for bad arguments
                arguments = dict(bound.arguments)
                arguments.pop(next(iter(signature.parameters)))  # self
                for name, param in signature.parameters.items():
                    if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                        arguments.update(arguments.pop(name))
                object.__setattr__(self, CONFIG_ATTR, {"name": None, "kwargs": arguments})
            original(self, *args, **kw)

        cls.__init__ = __init__

    @property
    def config(self) -> dict:
        """``{"name": registry name or None, "kwargs": constructor keyword arguments}``."""
        return get_config(self)


def get_config(module: nn.Module) -> dict | None:
    config = module.__dict__.get(CONFIG_ATTR)
    return None if config is None else {"name": config["name"], "kwargs": dict(config["kwargs"])}


def set_config(module: nn.Module, name: str | None, kwargs: dict) -> None:
    object.__setattr__(module, CONFIG_ATTR, {"name": name, "kwargs": dict(kwargs)})
