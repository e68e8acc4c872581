"""An app whose loader blocks on the FIFO ``HANGING_APP_FIFO`` until a test writes to it."""

from __future__ import annotations

import os
from functools import partial

from fastapi import FastAPI

from mlpool.fastapi import pool_lifespan


def load_after_fifo(fifo: str) -> dict:
    with open(fifo) as f:
        f.read()
    return {"bias": 10}


app = FastAPI(lifespan=pool_lifespan({"m": partial(load_after_fifo, os.environ["HANGING_APP_FIFO"])}, nb_workers=2))
