"""The example app (examples/app) with the test-only iris scorer of
``helpers.held_iris``: requests can be held on a named pipe (see there)."""

from __future__ import annotations

from app import main

from helpers import held_iris

main.SCORERS["iris"] = held_iris.score_iris
app = main.app
