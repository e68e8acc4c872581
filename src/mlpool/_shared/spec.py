"""What the API processes sharing a pool agree on, and what a new pool host is given.

- :func:`check_share`: ``share_across_processes`` against the pool's other settings.
- :func:`fingerprint`: every setting, by name, as text; the host refuses a
  process whose fingerprint differs, naming the settings (``host.fingerprint_difference``).
- :class:`HostSpec`: the pool's options and each loader pickled by value. The
  host never unpickles a loader (:class:`PickledLoader`): it would import the
  app's modules there, and run what they run at import.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import socket
import sys
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

import cloudpickle

from mlpool._api.config import Model, PoolConfig
from mlpool._shared.protocol import PROTOCOL_VERSION
from mlpool._shared.rendezvous import Address
from mlpool._wire.serialization import dumps_by_value, loads_pickled

DEFAULT_GRACE = 5.0  # seconds the host outlives its last API process (a recycled one rejoins)


@dataclass
class HostSpec:
    """What a new host needs, from the API process that starts it."""

    key: str  # the pool's name, for messages
    socket_path: str
    options: bytes  # MLPool's arguments but the loaders, pickled by value; a Model's loader is a placeholder
    loaders: dict[str, bytes]  # each model's loader, pickled by value (passed on to the workers unopened)
    fingerprint: dict[str, str]  # what the API processes must agree on
    sys_path: list[str]
    grace: float

    def pool_options(self) -> dict[str, Any]:
        """MLPool's arguments, each loader a :class:`PickledLoader`."""
        options: dict[str, Any] = cloudpickle.loads(self.options)
        models = options["models_to_load"]
        options["models_to_load"] = {
            name: PickledLoader(data) if models[name] is None else replace(models[name], loader=PickledLoader(data))
            for name, data in self.loaders.items()
        }
        return options


class PickledLoader:
    """A loader as an API process pickled it. The host never unpickles it (so
    it never imports the app's modules, nor runs what they run at import):
    pickled again for a worker, it becomes the loader there."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __call__(self) -> Any:
        return loads_pickled(self.data)()

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return loads_pickled, (self.data,)


def check_share(share: object, config: PoolConfig) -> bool | str:
    """``share_across_processes`` checked against the pool's other settings."""
    if share is False:
        return False
    if share is not True and not (isinstance(share, str) and share):
        raise TypeError(f"share_across_processes must be True, False or a non-empty name, got {share!r}")
    if config.backend == "ray":
        raise ValueError(
            "share_across_processes does not apply to backend='ray': the API processes share the Ray "
            "cluster already; give each its own pool of actors"
        )
    if config.inline:
        raise ValueError("share_across_processes needs worker processes; nb_workers=0 runs jobs in the calling process")
    if not hasattr(socket, "SO_PEERCRED"):
        raise NotImplementedError("share_across_processes needs Linux (SO_PEERCRED on Unix sockets)")
    return share


def fingerprint(options: dict[str, Any]) -> dict[str, str]:
    """What every process sharing a pool must agree on, by setting: the
    models by name (a loader's code may differ between versions of the app;
    its name and settings may not) and every pool option."""
    result = {}
    for name, value in options.items():
        if name == "models_to_load":
            for model, loader in value.items():
                result[f"model {model!r}"] = _describe(loader)
        else:
            result[name] = _describe(value)
    return result


def _describe(value: Any) -> str:
    if is_dataclass(value) and not isinstance(value, type):
        parts = [f"{f.name}={_describe(getattr(value, f.name))}" for f in fields(value) if f.name != "loader"]
        return f"{type(value).__name__}({', '.join(parts)})"
    if isinstance(value, functools.partial):
        return f"partial({_describe(value.func)}, ...)"
    if callable(value):
        name = getattr(value, "__qualname__", None) or type(value).__qualname__
        return f"<{getattr(value, '__module__', None) or '?'}.{name}>"
    return repr(value)


def share_grace() -> float:
    """``$MLPOOL_SHARE_GRACE``: seconds a host outlives its last API process (5 by default)."""
    text = os.environ.get("MLPOOL_SHARE_GRACE", "")
    if not text:
        return DEFAULT_GRACE
    try:
        grace = float(text)
    except ValueError:
        grace = math.nan
    if not 0 <= grace <= 86400:
        raise ValueError(
            f"MLPOOL_SHARE_GRACE={text!r}: give the seconds a pool host outlives its last API process (0-86400)"
        )
    return grace


def hello(fingerprint: dict[str, str]) -> dict[str, Any]:
    """What an API process says first to a host."""
    return {"version": PROTOCOL_VERSION, "fingerprint": fingerprint, "pid": os.getpid()}


def pickled_loaders(loaders: dict[str, Any]) -> dict[str, bytes]:
    """Each loader pickled by value (a SerializationError names the model that cannot be)."""
    return {name: dumps_by_value(loader, f"the loader of model {name!r}") for name, loader in loaders.items()}


def host_spec(
    where: Address, options: dict[str, Any], fingerprint: dict[str, str], reloaded: dict[str, bytes] | None = None
) -> bytes:
    """The :class:`HostSpec` of a host this process would start, pickled (a
    loader that cannot be pickled raises SerializationError naming its model).
    ``reloaded``: loaders a reload_models put in place since, as pickled."""
    models = options["models_to_load"]
    loaders, settings = {}, {}
    for name, value in models.items():
        model = value if isinstance(value, Model) else None
        loaders[name] = value if model is None else model.loader
        settings[name] = None if model is None else replace(model, loader=dict)  # the loader goes apart
    pickled = dumps_by_value({**options, "models_to_load": settings}, "the pool's options")
    grace = share_grace()
    loader_pickles = {**pickled_loaders(loaders), **(reloaded or {})}
    spec = HostSpec(where.key, where.socket_path, pickled, loader_pickles, fingerprint, list(sys.path), grace)
    return pickle.dumps(spec)
