"""Options of the jobs made through a view (``pool.options(...)``) or a session."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class JobOptions:
    """Defaults for the jobs made through a view or a session (None: unset)."""

    priority: int | None = None
    timeout: float | None = None
    max_retries: int | None = None

    @classmethod
    def checked(cls, priority: object, timeout: object, max_retries: object) -> JobOptions:
        """Options from a caller's arguments: TypeError / ValueError naming the bad one."""
        if priority is not None:
            check_priority(priority)
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
                raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
            if not (timeout > 0 and math.isfinite(timeout)):
                raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
        if max_retries is not None:
            if isinstance(max_retries, bool) or not isinstance(max_retries, int):
                raise TypeError(f"max_retries must be an int, not {type(max_retries).__name__}")
            if max_retries < 0:
                raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        return cls(priority, timeout, max_retries)  # type: ignore[arg-type]

    def over(self, base: JobOptions) -> JobOptions:
        """These options, each unset one taken from ``base``."""
        return JobOptions(
            base.priority if self.priority is None else self.priority,
            base.timeout if self.timeout is None else self.timeout,
            base.max_retries if self.max_retries is None else self.max_retries,
        )


def check_priority(priority: object) -> None:
    """An int (not a bool), else TypeError."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an int (higher runs first), not {type(priority).__name__}")
