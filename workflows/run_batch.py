"""``alignserve run-batch``: an OpenAI batch file through the server's own endpoints.

    alignserve run-batch -i requests.jsonl -o results.jsonl [--model DIR --guide-models FILE ...]
    alignserve run-batch -i requests.jsonl -o results.jsonl --url http://127.0.0.1:8000

Without ``--url`` it builds the server's app in this process (the same settings flags as
``alignserve serve``, the same engine, guidance, search and cache) and sends each line to it
through an in-process ASGI transport: no port, no HTTP. With ``--url`` it sends the same lines
to a running server. Up to ``--concurrency`` lines run at once, so the engine batches them. Each
record is appended to the output as its request finishes (workflows.batch_file has the format);
a line that fails is recorded and the run goes on; a run started again on the same output skips
every line it already holds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx
from tqdm import tqdm

from workflows.batch_file import BatchRequest, InvalidLine, error_record, read_done, read_requests, response_record

REQUEST_TIMEOUT_S = 3600.0


@dataclass
class BatchSummary:
    ran: int = 0
    failed: int = 0  # answered with a status other than 200
    invalid: int = 0
    skipped: int = 0  # already in the output


def trim_partial_line(output: Path) -> None:
    """Drop a last line an interrupted run left unfinished (no newline), so appended records stay lines."""
    if not output.is_file():
        return
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        output.write_bytes(data[: data.rfind(b"\n") + 1])


async def _send(client: httpx.AsyncClient, request: BatchRequest) -> dict:
    try:
        response = await client.post(request.url, json=request.body)
    except httpx.HTTPError as exc:  # the server is gone or did not answer: recorded, the run goes on
        return error_record(InvalidLine(request.line, request.custom_id, "request_failed",
                                        f"{type(exc).__name__}: {exc}"))
    try:
        body: Any = response.json()
    except ValueError:
        body = {"error": {"message": response.text[:1000], "type": "server_error", "param": None, "code": None}}
    request_id = (response.headers.get("x-request-id") or (body.get("id") if isinstance(body, dict) else None)
                  or f"batch-{uuid.uuid4().hex}")
    return response_record(request, response.status_code, body, request_id)


async def run_batch(lines: list[str], output: TextIO, client: httpx.AsyncClient, done: Callable[[Any], bool],
                    concurrency: int, progress: bool = True) -> BatchSummary:
    """Send every request of `lines` not `done` through `client`, `concurrency` at a time, appending a record
    per line to `output` as it finishes."""
    summary = BatchSummary()
    pending: list[BatchRequest] = []
    for item in read_requests(lines):
        if done(item):
            summary.skipped += 1
        elif isinstance(item, InvalidLine):
            summary.invalid += 1
            _write(output, error_record(item))
        else:
            pending.append(item)
    slots = asyncio.Semaphore(concurrency)

    async def one(request: BatchRequest, bar: tqdm) -> None:
        async with slots:
            record = await _send(client, request)
        summary.ran += 1
        summary.failed += record["response"] is None or record["response"]["status_code"] != 200
        _write(output, record)
        bar.update()

    with tqdm(total=len(pending), desc="run-batch", unit="request", disable=not progress) as bar:
        await asyncio.gather(*(one(request, bar) for request in pending))
    return summary


def _write(output: TextIO, record: dict) -> None:
    output.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
    output.flush()


@contextlib.asynccontextmanager
async def in_process_client(settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the server's app built in this process (its lifespan starts and stops the engine)."""
    from server.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://alignserve",
                                     timeout=REQUEST_TIMEOUT_S) as client:
            yield client


def _remote_client(url: str, api_key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S)


def execute(args: argparse.Namespace, settings_from_args: Callable[[argparse.Namespace], Any]) -> int:
    """Run the batch the parsed arguments describe; 0 when every line was run (whatever it answered)."""
    lines = args.input.read_text().splitlines()
    trim_partial_line(args.output)
    done = read_done(args.output)
    if args.url is not None:
        client_context: Any = _remote_client(args.url, args.api_key)
    else:
        settings = settings_from_args(args)
        if settings is None:
            return 2
        client_context = in_process_client(settings)

    async def main() -> BatchSummary:
        async with client_context as client:
            with args.output.open("a") as output:
                return await run_batch(lines, output, client, done.covers, args.concurrency)

    summary = asyncio.run(main())
    print(f"run-batch: {summary.ran} run ({summary.failed} not 200), {summary.invalid} invalid lines, "
          f"{summary.skipped} already in {args.output}", file=sys.stderr)
    return 0


def add_run_batch_command(commands: argparse._SubParsersAction, add_settings_flags: Callable,
                          settings_from_args: Callable[[argparse.Namespace], Any]) -> None:
    parser = commands.add_parser(
        "run-batch", help="run an OpenAI batch file (JSON Lines) through the server's endpoints",
        description="Run each line of an OpenAI batch file ({custom_id, method: POST, url: /v1/completions or "
        "/v1/chat/completions, body}) through the server's own endpoints, guidance and search included, and "
        "append one OpenAI batch output record per line to the output as it finishes. Lines already in the "
        "output are skipped, so an interrupted run resumes. Without --url the server's app runs in this "
        "process (the serve flags below apply); with --url the lines go to a running server.")
    parser.add_argument("-i", "--input", type=Path, required=True, metavar="FILE", help="batch input file")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                        help="batch output file (appended to; its records are skipped on a rerun)")
    parser.add_argument("--url", default=None, help="a running server's base URL instead of one in this process")
    parser.add_argument("--api-key", default=None, help="API key for --url")
    parser.add_argument("--concurrency", type=int, default=64, help="lines in flight at once [default: %(default)s]")
    serve_flags = parser.add_argument_group("server settings (without --url)")
    add_settings_flags(serve_flags)
    parser.set_defaults(run=lambda args: execute(args, settings_from_args))
