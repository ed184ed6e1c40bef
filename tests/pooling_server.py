"""A pooling server speaking vLLM 0.32's /classify and /pooling shapes with deterministic scores, for tests.

    python -m tests.pooling_server --port PORT

A text scores ``text_score(text)`` (its CRC-32 scaled to [0, 1): distinct texts score apart); a
conversation (``messages``) that of its last message's content. ``POST /control {"mode": ...}``
sets how later scoring requests are answered: ``ok``; ``error`` (HTTP 500); ``hang`` (never
answers); ``exit`` (the process exits while the request is open, as a server going away). ``GET /calls`` lists the bodies of the scoring requests
received so far.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import zlib
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

app = FastAPI()
state: dict[str, Any] = {"mode": "ok", "calls": []}


class Control(BaseModel):
    mode: Literal["ok", "error", "hang", "exit"]


def text_score(text: str) -> float:
    return zlib.crc32(text.encode()) / 2**32


def scores_of(body: dict) -> list[float]:
    if "messages" in body:
        return [text_score(body["messages"][-1]["content"])]
    texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
    return [text_score(text) for text in texts]


async def answer(body: dict, api: str) -> JSONResponse:
    state["calls"].append({"api": api, **body})
    mode = state["mode"]
    if mode == "error":
        return JSONResponse({"error": {"message": "engine failed"}}, status_code=500)
    if mode == "hang":
        await asyncio.sleep(3600)
    if mode == "exit":
        os._exit(1)
    scores = scores_of(body)
    if api == "classify":
        data = [{"index": i, "label": "reward", "probs": [s], "num_classes": 1} for i, s in enumerate(scores)]
    else:
        data = [{"index": i, "object": "pooling", "data": [s]} for i, s in enumerate(scores)]
    return JSONResponse({"id": "pool-1", "object": "list", "created": 0, "model": body.get("model"), "data": data,
                         "usage": {"prompt_tokens": 0, "total_tokens": 0}})


@app.post("/classify")
async def classify(body: dict) -> JSONResponse:
    return await answer(body, "classify")


@app.post("/pooling")
async def pooling(body: dict) -> JSONResponse:
    return await answer(body, "pooling")


@app.post("/control")
async def control(body: Control) -> dict:
    state["mode"] = body.mode
    return {"mode": body.mode}


@app.get("/calls")
async def calls() -> list[dict]:
    return state["calls"]


@app.get("/health")
async def health() -> dict:
    return {}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    uvicorn.run(app, host="127.0.0.1", port=parser.parse_args().port, log_level="warning")
