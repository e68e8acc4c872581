"""Pools built in the worker mode a test module runs in.

The ``worker_mode`` fixture (conftest) runs a module's tests once per mode and
sets it here; tests build their pools with :func:`make_pool`, which adds the
mode's options to theirs (an option a test passes wins).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlpool import MLPool

MODE_OPTIONS: dict[str, dict[str, Any]] = {
    "spawned": {},
    "forked": {"share_models": True},  # forked from a model template
    # Several pools at once fit on the 2-CPU Ray instance.
    "ray": {"backend": "ray", "ray_options": {"num_cpus": 0.1}},
}

_mode = "spawned"


def set_mode(mode: str) -> str:
    """Make ``mode`` the one :func:`make_pool` builds in; returns the previous one."""
    global _mode
    if mode not in MODE_OPTIONS:
        raise ValueError(f"unknown worker mode {mode!r}")
    previous, _mode = _mode, mode
    return previous


def mode() -> str:
    return _mode


def make_pool(models_to_load: Any, nb_workers: int | None = None, **options: Any) -> MLPool:
    """``MLPool(models_to_load, nb_workers, **options)`` in the current worker mode."""
    return MLPool(models_to_load, nb_workers, **{**MODE_OPTIONS[_mode], **options})


def mode_options() -> dict[str, Any]:
    """The options of the current mode, for code that builds pools another way."""
    return dict(MODE_OPTIONS[_mode])


Loader = Callable[[], Any]
