"""The checks on what a caller gives as loaders: at construction and to ``reload_models``.

Each raises at the call, in the caller's thread, with an error that names the
model and the problem; nothing reaches the engine before they pass.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

from mlpool._api.config import Model, loaders_of
from mlpool._wire.serialization import async_kind
from mlpool.errors import UnknownModelError


def check_loaders(models_to_load: Any) -> dict[str, Callable[[], Any]]:
    """The constructor's ``models_to_load`` as ``{name: loader}`` (a Model's loader unwrapped)."""
    if not isinstance(models_to_load, Mapping):
        raise TypeError(
            f"models_to_load must be a mapping of model name to loader, not {type(models_to_load).__name__}"
        )
    if not models_to_load:
        raise ValueError("models_to_load is empty: give at least one {name: loader}")
    models_to_load = loaders_of(models_to_load)
    for name, loader in models_to_load.items():
        if not isinstance(name, str):
            raise TypeError(f"model names must be str, got {name!r}")
        _check_loader(name, loader)
    return dict(models_to_load)


def check_reload(
    models_to_load: Any, known: frozenset[str] | set[str], timeout: Any, surge: Any
) -> dict[str, Callable[[], Any]] | None:
    """``reload_models``' arguments: the new loaders by name (None: rerun the
    current ones). Every model must be one the pool serves, and keeps its
    group and settings, so a :class:`Model` is refused."""
    if isinstance(surge, bool) or not isinstance(surge, int) or surge not in (0, 1):
        raise ValueError(f"surge must be 1 (start each new worker beside the old one) or 0 (replace), got {surge!r}")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
        if not (0 < timeout < math.inf):
            raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
    if models_to_load is None:
        return None
    if not isinstance(models_to_load, Mapping):
        raise TypeError(
            f"models_to_load must be None (rerun every loader) or a mapping of model name to its new loader, "
            f"not {type(models_to_load).__name__}"
        )
    if not models_to_load:
        raise ValueError("models_to_load is empty: give {name: new loader}, or None to rerun every loader")
    served = ", ".join(repr(m) for m in sorted(known))
    for name, loader in models_to_load.items():
        if name not in known:
            raise UnknownModelError(f"unknown model {name!r}; this pool serves {served} (a reload cannot add a model)",
                                    model_name=name if isinstance(name, str) else None)  # fmt: skip
        if isinstance(loader, Model):
            raise TypeError(
                f"the new loader of model {name!r} is a Model: a reload replaces only the loader, and the model "
                f"keeps its settings; give the loader itself (Model.loader)"
            )
        _check_loader(name, loader)
    return dict(models_to_load)


def _check_loader(name: str, loader: Any) -> None:
    if not callable(loader):
        raise TypeError(f"the loader of model {name!r} must be callable, got {type(loader).__name__}")
    if (kind := async_kind(loader)) is not None:
        raise TypeError(
            f"the loader of model {name!r} is an {kind}; each worker calls it once, without an event "
            "loop, and would not get a model: make it a plain def"
        )
    required = _required_parameters(loader)
    if required:
        listed = ", ".join(required)
        raise TypeError(
            f"the loader of model {name!r} requires argument(s) {listed}, but each worker calls it with none: "
            f"bind them with functools.partial, e.g. {{{name!r}: functools.partial({_name(loader)}, ...)}}"
        )


def _required_parameters(loader: Callable[..., Any]) -> list[str]:
    """The parameters ``loader()`` would be missing ([] when its signature cannot be read)."""
    try:
        signature = inspect.signature(loader)
    except (TypeError, ValueError):  # some builtins and C callables have none
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in signature.parameters.values() if p.kind in kinds and p.default is p.empty]


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__
