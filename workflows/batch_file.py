"""OpenAI's batch file format: the requests of a batch input file and the records of its output.

Input, one JSON object per line:

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Output, one record per input line, in the order the requests finish (OpenAI's batch output):

    {"id": "batch_req_...", "custom_id": "q1", "error": null,
     "response": {"status_code": 200, "request_id": "...", "body": {... the endpoint's response ...}}}

An answer of the server other than 200 is a record like that one with the status and the error
envelope as its body. A line that is no request (not JSON, a field missing, a method or URL the
server does not serve, a `custom_id` seen before) gets a record with `response: null` and
`error: {"code", "message", "line"}`. A run reads the output file first and skips every line that
already has a record, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

URLS = ("/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class BatchRequest:
    line: int  # 1-based line number in the input file
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class InvalidLine:
    line: int
    custom_id: str | None
    code: str
    message: str


def _check(entry: Any, line: int) -> BatchRequest | InvalidLine:
    if not isinstance(entry, dict):
        return InvalidLine(line, None, "invalid_request", "The line is not a JSON object.")
    custom_id = entry.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return InvalidLine(line, None, "invalid_request", "custom_id must be a non-empty string.")
    missing = [name for name in ("method", "url", "body") if name not in entry]
    if missing:
        return InvalidLine(line, custom_id, "invalid_request", f"Missing field(s): {', '.join(missing)}.")
    extra = sorted(set(entry) - {"custom_id", "method", "url", "body"})
    if extra:
        return InvalidLine(line, custom_id, "invalid_request", f"Unknown field(s): {', '.join(extra)}.")
    if entry["method"] != "POST":
        return InvalidLine(line, custom_id, "invalid_method", f"method must be POST, got {entry['method']!r}.")
    if entry["url"] not in URLS:
        return InvalidLine(line, custom_id, "invalid_url",
                           f"url must be one of {', '.join(URLS)}, got {entry['url']!r}.")
    if not isinstance(entry["body"], dict):
        return InvalidLine(line, custom_id, "invalid_request", "body must be a JSON object.")
    if entry["body"].get("stream"):
        return InvalidLine(line, custom_id, "invalid_request", "body.stream must be false in a batch.")
    return BatchRequest(line, custom_id, entry["url"], entry["body"])


def read_requests(lines: Iterable[str]) -> Iterator[BatchRequest | InvalidLine]:
    """Each non-empty line as a request, or as why it is none; a repeated custom_id is an error (the
    first line with it runs)."""
    seen: set[str] = set()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            item = _check(json.loads(text), number)
        except json.JSONDecodeError as exc:
            item = InvalidLine(number, None, "invalid_json", f"The line is not valid JSON: {exc.msg}.")
        if isinstance(item, BatchRequest):
            if item.custom_id in seen:
                item = InvalidLine(number, item.custom_id, "duplicate_custom_id",
                                   f"custom_id {item.custom_id!r} appears on an earlier line; this line was not run.")
            else:
                seen.add(item.custom_id)
        yield item


def response_record(request: BatchRequest, status_code: int, body: Any, request_id: str) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request.custom_id,
            "response": {"status_code": status_code, "request_id": request_id, "body": body}, "error": None}


def error_record(invalid: InvalidLine) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": invalid.custom_id, "response": None,
            "error": {"code": invalid.code, "message": invalid.message, "line": invalid.line}}


@dataclass(frozen=True)
class Done:
    """What an output file already holds: the custom_ids answered and the lines reported invalid."""

    custom_ids: frozenset[str]
    invalid_lines: frozenset[int]

    def covers(self, item: BatchRequest | InvalidLine) -> bool:
        if isinstance(item, InvalidLine):
            # A duplicate shares its custom_id with the line that ran: known by its line number only.
            return item.line in self.invalid_lines or (
                item.code != "duplicate_custom_id" and item.custom_id in self.custom_ids)
        return item.custom_id in self.custom_ids


def read_done(output: Path) -> Done:
    """The records of an earlier run's output (a last line cut short by an interruption is ignored)."""
    custom_ids: set[str] = set()
    invalid_lines: set[int] = set()
    if output.is_file():
        for text in output.read_text().splitlines():
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                continue
            if record.get("response") is not None:
                custom_ids.add(record["custom_id"])
            elif isinstance(record.get("error"), dict) and "line" in record["error"]:
                invalid_lines.add(record["error"]["line"])
    return Done(frozenset(custom_ids), frozenset(invalid_lines))
