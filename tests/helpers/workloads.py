"""Loaders and scoring functions the tests run in real worker processes.

Module-level, so they pickle by reference. Jobs that must stay running until
a test lets them go block on a FIFO: opening it for writing returns only
once the job has opened it for reading, i.e. once it is running.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from pathlib import Path


class TextClassifier:
    """Stands in for the seed README's text classifier: a real object, loaded once per worker."""

    loads = 0

    def __init__(self, vocabulary_path: str) -> None:
        self.positive = set(Path(vocabulary_path).read_text().split())
        self.pid = os.getpid()

    def classify_text(self, text: str) -> str:
        words = text.lower().split()
        score = sum(word.strip(".,") in self.positive for word in words)
        return "positive" if score > 0 else "negative"


def load_text_classifier(weights_path: str) -> TextClassifier:
    return TextClassifier(weights_path)


def score_text_classifier(model: TextClassifier, text: str) -> str:
    return model.classify_text(text)


def load_constant() -> dict:
    return {"bias": 10, "pid": os.getpid()}


def load_none():
    return None


def load_raises():
    raise RuntimeError("weights file is corrupt")


def add(model: dict, x: int, y: int = 0) -> int:
    return model["bias"] + x + y


def pid(model: dict) -> int:
    return os.getpid()


def echo(model: dict, value):
    return value


def raise_value_error(model: dict, message: str) -> None:
    raise ValueError(message)


class NeedsTwoArgs(Exception):
    """Unpicklable the usual way: its __init__ takes two arguments."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a} and {b}")


def raise_odd_exception(model: dict) -> None:
    raise NeedsTwoArgs(1, 2)


def return_unpicklable(model: dict):
    return threading.Lock()


def wait_for_release(model: dict, fifo: str) -> int:
    """Run until the test writes to ``fifo``; return this worker's pid.

    The pid is also written to ``fifo + ".pid"`` before the job blocks.
    """
    Path(fifo + ".pid").write_text(str(os.getpid()))
    with open(fifo) as f:
        f.read()
    return os.getpid()


def add_then_say(model: dict, x: int, fifo: str) -> int:
    """``add``, after saying so on ``fifo`` (its writer opens and closes: the test's read returns)."""
    with open(fifo, "w"):
        pass
    return model["bias"] + x


def touch(model: dict, path: str) -> str:
    Path(path).touch()
    return path


def sigkill_self(model: dict) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def segfault(model: dict) -> None:
    ctypes.string_at(0)


def exit_now(model: dict, code: int) -> None:
    os._exit(code)


def spin(model: dict, seconds: float) -> int:
    """Burn CPU (holding the GIL) for ``seconds``."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


def thread_settings(model: dict) -> dict:
    from threadpoolctl import threadpool_info

    return {
        "env": os.environ.get("OMP_NUM_THREADS"),
        "pools": [(info["internal_api"], info["num_threads"]) for info in threadpool_info()],
    }


def load_numpy_model() -> dict:
    import numpy as np

    return {"weights": np.arange(4.0)}


class CountingFunction:
    """A scoring function that counts how often the parent pickles it."""

    pickled = 0

    def __call__(self, model: dict, x: int) -> int:
        return x * 2

    def __reduce__(self):
        CountingFunction.pickled += 1
        return (CountingFunction, ())


def crash_first_time(model: dict, marker: str) -> str:
    """Crash the worker on the first attempt (no marker yet), succeed after."""
    path = Path(marker)
    if not path.exists():
        path.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return "second try"


def count_attempt_then(model: dict, log: str, action: str):
    """Append a line to ``log``, then do ``action``: crash, raise, spin or return."""
    with open(log, "a") as f:
        f.write("attempt\n")
    if action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "raise":
        raise RuntimeError("user error")
    if action == "spin":
        spin(model, 600.0)
    return "ok"


def load_unless_flagged(flag: str, how: str = "raise") -> dict:
    """Load normally until ``flag`` exists; then raise, hang, or die during loading."""
    if Path(flag).exists():
        if how == "raise":
            raise RuntimeError("model storage is gone")
        if how == "hang":
            threading.Event().wait()  # a stuck mount: never returns
        os.kill(os.getpid(), signal.SIGKILL)
    return load_constant()


def hold_memory(model: dict, megabytes: int) -> int:
    """Grow the worker's resident memory and keep it (on the model)."""
    model.setdefault("ballast", []).append(bytearray(os.urandom(16)) * (megabytes * 2**16))
    return os.getpid()


import mlpool  # noqa: E402


@mlpool.batched(max_batch_size=8, max_wait_ms=5.0)
def array_sums(model: dict, arrays: list) -> list:
    """Each array's sum, with the size of the batch it came in."""
    return [(float(a.sum()), len(arrays)) for a in arrays]


@mlpool.batched(max_batch_size=8, max_wait_ms=5.0)
def double_all(model: dict, items: list) -> list:
    """Each item doubled, with the size of the batch it came in."""
    return [(item * 2, len(items)) for item in items]


@mlpool.batched(max_batch_size=16, max_wait_ms=60_000.0)
def slow_to_fill(model: dict, items: list) -> list:
    return [(item, len(items)) for item in items]


@mlpool.batched
def batch_raises(model: dict, items: list) -> list:
    raise ValueError(f"bad batch of {len(items)}")


@mlpool.batched
def batch_wrong_length(model: dict, items: list) -> list:
    return items[:-1]


@mlpool.batched(max_batch_size=4)
def batch_echo(model: dict, items: list) -> list:
    return [(item, len(items)) for item in items]


@mlpool.batched(max_batch_size=4)
def batch_crash_on(model: dict, items: list) -> list:
    if "crash" in items:
        os.kill(os.getpid(), signal.SIGKILL)
    return [(item, len(items)) for item in items]


@mlpool.batched(max_batch_size=4)
def batch_spin(model: dict, items: list) -> list:
    spin(model, 600.0)
    return items


def array_summary(model: dict, array) -> tuple:
    """What the worker received: checksum, shape, dtype, and whether it is a read-only view."""

    return (byte_sum(array), array.shape, str(array.dtype), bool(array.flags.writeable), bool(array.flags.owndata))


def byte_sum(array) -> int:
    """A checksum of an array's bytes, whatever its dtype and memory order."""
    import numpy as np

    return int(np.ascontiguousarray(array).reshape(-1).view(np.uint8).sum(dtype=np.uint64))


def make_array(model: dict, n: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 255, size=n, dtype=np.uint8)


def echo_plus_one(model: dict, array):
    return array + 1


def try_to_write(model: dict, array) -> None:
    array[0] = 0


def frame_summary(model: dict, frame) -> tuple:
    return float(frame["x"].sum()), int(frame["y"].sum()), list(frame.columns)


def table_summary(model: dict, table) -> tuple:
    return float(table.column("x").to_numpy().sum()), table.num_rows


def bytes_digest(model: dict, data) -> tuple:
    import hashlib

    return type(data).__name__, hashlib.sha256(bytes(data)).hexdigest()


def hold_array_then_die(model: dict, array, fifo: str) -> None:
    wait_for_release(model, fifo)


def copy_of(model: dict, array):
    return array.copy()


def load_logged(log: str) -> dict:
    """load_constant, appending this process's pid to ``log`` at each load."""
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    return load_constant()


def load_weights(megabytes: int) -> dict:
    """A model holding ``megabytes`` of NumPy weights (written, so resident)."""
    import numpy as np

    return {"weights": np.full(megabytes * 2**17, 0.5), "pid": os.getpid()}


def weights_mean(model: dict) -> float:
    return float(model["weights"].mean())


def own_actor(model: dict):
    """The handle of the Ray actor running this job (backend="ray")."""
    import ray

    return ray.get_runtime_context().current_actor


def hang_on_fifo(model: dict, fifo: str) -> int:
    """Block on ``fifo`` (the line a stack dump must show); the pid goes to ``fifo + ".pid"``."""
    Path(fifo + ".pid").write_text(str(os.getpid()))
    with open(fifo) as f:  # hang_on_fifo: waiting here (until the test opens the other end)
        f.read()
    return os.getpid()


def abort(model: dict) -> None:
    os.abort()


def busy_until(model: dict, fifo: str, marker: str) -> int:
    """Say it runs (the test's read end of ``fifo`` opens), then burn CPU in
    Python, holding the GIL, until ``marker`` exists."""
    with open(fifo, "w"):  # returns once the test opened the other end
        pass
    n = 0
    while not os.path.exists(marker):
        n += 1
    return n
