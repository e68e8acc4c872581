"""The example app under ``uvicorn --workers 2`` with one shared pool, over real HTTP."""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from helpers.server import EXAMPLES, UvicornServer

sys.path.insert(0, str(EXAMPLES))
from app import models

pytestmark = pytest.mark.timeout(300)

IRIS = [6.2, 2.2, 4.5, 1.5]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read().decode()


def _hosts(server: UvicornServer) -> list[psutil.Process]:
    return [p for p in server.children() if "mlpool._shared.host" in " ".join(p.cmdline())]


def test_two_uvicorn_workers_share_one_pool_host():
    models.train_if_missing(with_cnn=True)
    env = {"MLPOOL_DEMO_SHARE": "1", "MLPOOL_SHARE_GRACE": "0.5"}
    server = UvicornServer("app.main:app", EXAMPLES, env=env, args=("--workers", "2"))
    try:
        mark = server.wait_for_log("Application startup complete")
        server.wait_for_log("Application startup complete", since=server.log.index(mark) + 1)
        with ThreadPoolExecutor(8) as executor:
            answers = list(executor.map(lambda _: _post(f"{server.url}/iris", {"features": IRIS}), range(60)))
        assert {status for status, _ in answers} == {200}
        assert len({json.dumps(body, sort_keys=True) for _, body in answers}) == 1  # one model, one answer
        hosts = _hosts(server)
        assert len(hosts) == 1  # one host for both API processes
        workers = [p for p in hosts[0].children() if "resource_tracker" not in " ".join(p.cmdline())]
        assert len(workers) == 2  # the demo's 1 + 1 workers, loaded once, not once per API process
        metrics = _get(f"{server.url}/metrics")
        assert re.search(r'mlpool_shared_processes\{pool="demo"\} 2\.0', metrics), metrics[-2000:]
        assert re.search(r'mlpool_process_jobs_total\{outcome="completed",pool="demo",process="\d+"\}', metrics)
    finally:
        assert not server.stop()  # Ctrl-C: both API processes leave, then the host ends with its workers
