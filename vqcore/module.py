"""How a quantizer was built: its config, recorded at construction and written into checkpoints.

A config is ``{"name": registry name or None, "version": config version, "kwargs": {...}}``:

- ``kwargs`` holds every constructor argument, defaults included (the call bound against the
  signature), so that a checkpoint rebuilds the same module even after a release changes a default.
  Arguments a constructor forwards through ``**kwargs`` (ResidualVQ passes its extra arguments on to
  its VectorQuantize layers) are recorded as passed: the defaults of whatever receives them are not;
- ``version`` is the method's config version (:attr:`QuantizerModule.config_version`; a plain factory
  may carry a ``config_version`` attribute, default 1). A plugin bumps it when the meaning of its
  constructor arguments changes, and may declare how to read older checkpoints with
  :meth:`QuantizerModule.upgrade_config`.

Subclasses of :class:`QuantizerModule` record their config in the outermost constructor call; any
module built by :func:`vqcore.create` gets it from ``create`` (the factory's signature bound when it
can be inspected, the keyword arguments as passed otherwise).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from vqcore.errors import ConfigurationError, MissingArgumentsError

CONFIG_ATTR = "_vqcore_config"
DEFAULT_CONFIG_VERSION = 1


def bind_arguments(
    signature: inspect.Signature, args: tuple, kwargs: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The call's arguments by name, defaults applied; ``**kwargs`` forwarded arguments merged in as passed.

    None when values go through ``*args`` (a config holds keyword arguments only). Raises Python's own
    TypeError when the call does not fit ``signature``.
    """
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        else:
            arguments[name] = value
    return arguments


def missing_arguments(signature: inspect.Signature, given: Mapping[str, Any]) -> list[str]:
    """Required parameters of ``signature`` (no default, not ``*args`` / ``**kwargs``) absent from
    ``given``."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [
        name
        for name, param in signature.parameters.items()
        if param.default is inspect.Parameter.empty and param.kind not in variadic and name not in given
    ]


def unexpected_arguments(signature: inspect.Signature, given: Mapping[str, Any]) -> list[str]:
    """Names in ``given`` that ``signature`` takes by no keyword (none when it has ``**kwargs``)."""
    params = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [name for name in given if name not in params or params[name].kind not in keyword]


def bind_keyword_call(
    signature: inspect.Signature, kwargs: Mapping[str, Any], quantizer: str
) -> dict[str, Any]:
    """:func:`bind_arguments` of a keyword-only call (what :func:`vqcore.create` makes) with errors that
    name the quantizer: :class:`~vqcore.errors.MissingArgumentsError` when required arguments are
    missing (all of them named), a TypeError naming unexpected (and missing) arguments otherwise."""
    missing = missing_arguments(signature, kwargs)
    unexpected = unexpected_arguments(signature, kwargs)
    if missing and not unexpected:
        raise MissingArgumentsError(quantizer, missing)
    if unexpected:
        also = f"; missing required arguments: {', '.join(missing)}" if missing else ""
        raise TypeError(
            f"quantizer {quantizer!r}: got an unexpected keyword argument {', '.join(map(repr, unexpected))}"
            f"{also}"
        )
    return bind_arguments(signature, (), kwargs) or {}  # never None: no positional values here


def check_finite_floats(owner: str, arguments: Mapping[str, Any]) -> None:
    """Every float among a constructor's arguments (alone, or in a list or tuple) is finite: a NaN weight or
    decay would be accepted silently and turn the first training step's state into NaN. Raises
    :class:`~vqcore.errors.ConfigurationError` naming the argument."""
    for name, value in arguments.items():
        values = value if isinstance(value, (list, tuple)) else (value,)
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigurationError(f"{owner}: {name} must be a finite number, got {value!r}")


def factory_signature(factory: Callable[..., Any]) -> inspect.Signature | None:
    """``inspect.signature(factory)``, or None where it cannot be inspected (some builtins, C extensions)."""
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):
        return None


def config_version_of(factory: Callable[..., Any]) -> int:
    """The config version a factory builds: its ``config_version`` attribute, default 1."""
    version = getattr(factory, "config_version", DEFAULT_CONFIG_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise TypeError(
            f"{getattr(factory, '__qualname__', factory)!r}.config_version must be a positive int, "
            f"got {version!r}"
        )
    return version


class QuantizerModule(nn.Module):
    """``nn.Module`` that records its config (every constructor argument, defaults included).

    ``config_version`` (class attribute, default 1): bump it when a release changes what the
    constructor arguments mean, so that older checkpoints are not silently misread; override
    :meth:`upgrade_config` to keep loading them.
    """

    config_version: ClassVar[int] = DEFAULT_CONFIG_VERSION

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        config_version_of(cls)  # a bad config_version fails at class definition, not at save time
        if "__init__" not in cls.__dict__:
            return
        original = cls.__init__
        signature = inspect.signature(original)
        self_name = next(iter(signature.parameters))

        @functools.wraps(original)
        def __init__(self, *args, **kw):
            if CONFIG_ATTR not in self.__dict__:  # outermost constructor only
                try:
                    arguments = bind_arguments(signature, (self, *args), kw)
                except TypeError:
                    return original(self, *args, **kw)  # raises Python's own message for bad arguments
                if arguments is not None:
                    arguments.pop(self_name)
                    check_finite_floats(type(self).__name__, arguments)
                set_config(self, None, arguments, type(self).config_version)
            original(self, *args, **kw)

        cls.__init__ = __init__  # type: ignore[method-assign]  # wraps the subclass's own constructor

    @classmethod
    def upgrade_config(cls, kwargs: dict[str, Any], version: int) -> dict[str, Any] | None:
        """Constructor kwargs saved at an older config ``version`` -> kwargs for ``cls.config_version``.

        Called by :func:`vqcore.load` for a checkpoint whose version is lower than the class's; the
        returned kwargs build the module (``vqcore.create(name, **kwargs)``). The default knows no
        older version and returns None, which makes the load fail with
        :class:`~vqcore.errors.ConfigVersionError`.
        """
        return None

    @property
    def config(self) -> dict[str, Any] | None:
        """``{"name": registry name or None, "version": int, "kwargs": every constructor argument}``."""
        return get_config(self)


def get_config(module: nn.Module) -> dict[str, Any] | None:
    """A copy of ``module``'s recorded config, or None when it records none. ``kwargs`` is None when the
    constructor took values through ``*args`` (such a module cannot be saved)."""
    config = module.__dict__.get(CONFIG_ATTR)
    if config is None:
        return None
    kwargs = config["kwargs"]
    return {
        "name": config["name"],
        "version": config["version"],
        "kwargs": None if kwargs is None else dict(kwargs),
    }


def set_config(
    module: nn.Module,
    name: str | None,
    kwargs: Mapping[str, Any] | None,
    version: int = DEFAULT_CONFIG_VERSION,
) -> None:
    """Record ``module``'s config (outside ``nn.Module``'s attribute machinery: not in the state_dict).
    A ``torch.dtype`` argument (alone, in a list or tuple, or in forwarded ``**kwargs``) is recorded by
    name (``"bfloat16"``), so the config stays JSON: a constructor that takes dtypes accepts names too."""
    recorded = None if kwargs is None else {key: _dtype_names(value) for key, value in kwargs.items()}
    object.__setattr__(module, CONFIG_ATTR, {"name": name, "version": version, "kwargs": recorded})


def _dtype_names(value: Any) -> Any:
    """``value`` with every ``torch.dtype`` in it replaced by its name (a sequence holding one: a list)."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.dtype) for v in value):
        return [_dtype_names(v) for v in value]
    if isinstance(value, dict):
        return {key: _dtype_names(v) for key, v in value.items()}
    return value
