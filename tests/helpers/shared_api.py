"""An API process for the shared-pool tests: attaches to a pool host and obeys commands.

Run as ``python -m helpers.shared_api NAME NB_WORKERS [MAX_QUEUE_SIZE]``; reads
one JSON command per line on stdin and answers one JSON line on stdout:

    {"op": "info"}                      -> {"pid", "host_pid", "processes"}
    {"op": "pids", "n": N}              -> worker pids of N jobs
    {"op": "version"}                   -> the model's version (shared_models.version)
    {"op": "job"}                       -> a job id (create_job) of a tagged job
    {"op": "get", "id": ID}             -> its result, or the error's class name
    {"op": "hold", "fifo": P, "n": N, "interrupt": bool}
                                        -> N jobs that wait on FIFO P (submitted, in a
                                           session if interrupt), then a stats() round trip
    {"op": "tag", "log": P, "tag": T, "n": N}
                                        -> N jobs that append T to file P, queued
    {"op": "exit"}                      -> leaves the pool (shutdown), then exits

Models and functions are those of :mod:`helpers.shared_models`, so that
every process sharing a pool gives the same loaders.
"""

from __future__ import annotations

import json
import os
import sys

from helpers import shared_models
from mlpool import MLPool


def main() -> None:
    name, nb_workers = sys.argv[1], int(sys.argv[2])
    max_queue_size = int(sys.argv[3]) if len(sys.argv) > 3 else None
    models = {"m": shared_models.load_gated} if os.environ.get("MLPOOL_TEST_GATE") else shared_models.MODELS
    pool = MLPool(models, nb_workers, share_across_processes=name, max_queue_size=max_queue_size)
    held = []
    sessions = []
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "info":
            stats = pool.stats()
            assert stats.process is not None
            process = stats.process
            answer: object = {"pid": os.getpid(), "host_pid": process.host_pid, "processes": process.processes}
        elif op == "pids":
            answer = [pool.score("m", shared_models.pid) for _ in range(command["n"])]
        elif op == "version":
            answer = pool.score("m", shared_models.version)
        elif op == "job":
            answer = pool.create_job(shared_models.pid, "m")
        elif op == "get":
            try:
                answer = pool.get_result(command["id"], timeout=30)
            except Exception as exc:
                answer = type(exc).__name__
        elif op == "hold":
            target = pool
            if command.get("interrupt"):
                session = pool.session(interrupt=True)
                sessions.append(session)
                target = session  # type: ignore[assignment]
            held += [target.submit("m", shared_models.wait_on, command["fifo"]) for _ in range(command["n"])]
            pool.stats()  # a round trip: the host has queued every job sent before it
            answer = "held"
        elif op == "tag":
            tag = (shared_models.append_tag, command["log"], command["tag"])
            held += [pool.submit("m", *tag) for _ in range(command["n"])]
            pool.stats()
            answer = "queued"
        elif op == "exit":
            pool.shutdown(cancel_pending=True)
            print(json.dumps("bye"), flush=True)
            return
        else:
            answer = f"unknown op {op}"
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
