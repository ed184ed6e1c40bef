"""Sampling every prompt K times per configuration through a server's OpenAI endpoints.

Chat prompts go to ``/v1/chat/completions``, text prompts to ``/v1/completions``; each request
asks for one choice with ``"cache": false`` (every sample is generated) and the configuration's
``guidance`` / ``search`` fields. Requests run concurrently, at most ``concurrency`` at a time.

Seeds (common random numbers): sample j of prompt i is sent with seed
``seed + (i * K + j) * S``, where S is the number of seeds one sample consumes on the server:
1 for plain and guided sampling (so the base and every guided configuration see the same
seeds), N for best-of-N (its candidate c is seeded ``request seed + c``, docs/guidance.md: so
best-of-1 is exactly the base, and the candidates of different samples never share a seed),
``ceil(max_tokens / block_tokens) * candidates`` for blockwise, and ``max_steps`` times the
candidates of a step for beam, DVTS and particle filtering.

A search request carries the prompt's ``answer`` as ``search.reference`` (unless its configuration
gives one), for a verifier scorer that compares with it; the local verifier reads it too.

A request that fails (transport error, or any status but 200; 429 is retried after its
Retry-After) raises EvalRequestError naming the configuration, the prompt and the sample. A
connection that breaks (``RETRIED_TRANSPORT_ERRORS``) is retried ``TRANSPORT_RETRIES`` times first.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from tqdm.auto import tqdm

from guidance.verifiers import RegisteredVerifier
from workflows.evaluation.configs import DEFAULT_MAX_STEPS, STEP_SEARCHES, EvalConfig
from workflows.evaluation.samples import Sample
from workflows.prompt_file import PromptRecord

logger = logging.getLogger(__name__)

MAX_RATE_LIMITED_RETRIES = 60
# A kept-alive connection the server closes as idle just as the client reuses it fails with one of
# these (or the connection is refused or reset). Resending is safe: every eval request is seeded and
# sent with "cache": false, so a request the server did get and partly generated gives the same
# sample again; the cost is only duplicate work. Timeouts are not retried: they mean an overloaded
# or stuck server, which a resend would load further.
RETRIED_TRANSPORT_ERRORS = (httpx.NetworkError, httpx.RemoteProtocolError)
TRANSPORT_RETRIES = 2
TRANSPORT_BACKOFF_S = 0.5  # doubled each retry


class EvalRequestError(RuntimeError):
    """A request of the evaluation failed; the message names the configuration, prompt and sample."""


@dataclass(frozen=True)
class SamplingSettings:
    model: str  # the served model name
    samples: int = 4  # K, per prompt
    temperature: float = 0.8
    top_p: float = 0.9
    max_tokens: int = 32
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings of every request (e.g. HumanEval's end-of-function markers)


def verifier_prompt(record: PromptRecord) -> str:
    """What the verifier reads as the prompt: the text, or the chat messages' contents joined by newlines."""
    if record.messages is not None:
        return "\n".join(m["content"] for m in record.messages)
    assert record.prompt is not None
    return record.prompt


def seeds_per_sample(config: EvalConfig, max_tokens: int) -> int:
    """S, the seeds one sample of ``config`` consumes on the server (module docstring)."""
    search = config.search
    if search is None:
        return 1
    if search["type"] == "best_of_n":
        return search["n"]
    if search["type"] in STEP_SEARCHES:
        return search.get("max_steps", DEFAULT_MAX_STEPS) * config.candidates_per_step
    return math.ceil(max_tokens / search["block_tokens"]) * search["candidates"]


def sample_seed(settings: SamplingSettings, config: EvalConfig, prompt_index: int, sample: int) -> int:
    """``seed + (i * K + j) * S``."""
    return settings.seed + (prompt_index * settings.samples + sample) * seeds_per_sample(config, settings.max_tokens)


def request(record: PromptRecord, config: EvalConfig, settings: SamplingSettings, seed: int) -> tuple[str, dict]:
    """(endpoint path, JSON body) of one sample."""
    extension = dict(config.extension)
    search = extension.get("search")
    if search is not None and record.answer is not None and "reference" not in search:
        extension["search"] = {**search, "reference": record.answer}
    body: dict[str, Any] = {"model": settings.model, "n": 1, "max_tokens": settings.max_tokens,
                            "temperature": settings.temperature, "top_p": settings.top_p, "seed": seed,
                            "cache": False, **extension}
    if settings.stop:
        body["stop"] = list(settings.stop)
    if record.messages is not None:
        return "/v1/chat/completions", {**body, "messages": list(record.messages)}
    return "/v1/completions", {**body, "prompt": record.prompt}


def _error_detail(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        param = f" (param {error['param']})" if error.get("param") else ""
        return f"{error['message']}{param}"
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


class Runner:
    """Sends one configuration's requests and turns the responses into scored samples."""

    def __init__(self, client: httpx.AsyncClient, records: Sequence[PromptRecord], settings: SamplingSettings,
                 verifier: RegisteredVerifier, concurrency: int) -> None:
        self.client, self.records, self.settings = client, list(records), settings
        self.verifier, self.extractor = verifier, verifier.answer
        self.gate = asyncio.Semaphore(concurrency)

    async def _send(self, where: str, path: str, body: dict) -> httpx.Response:
        """POST ``body``, retrying ``RETRIED_TRANSPORT_ERRORS`` (see there) with a doubling backoff."""
        retries = 0
        while True:
            try:
                async with self.gate:
                    return await self.client.post(path, json=body)
            except RETRIED_TRANSPORT_ERRORS as exc:
                if retries == TRANSPORT_RETRIES:
                    raise EvalRequestError(f"{where}: {type(exc).__name__} on each of {retries + 1} attempts: "
                                           f"{exc}") from exc
                retries += 1
                logger.warning("%s: %s: %s; retry %d of %d", where, type(exc).__name__, exc, retries,
                               TRANSPORT_RETRIES)
            except httpx.HTTPError as exc:
                raise EvalRequestError(f"{where}: {type(exc).__name__}: {exc}") from exc
            await asyncio.sleep(TRANSPORT_BACKOFF_S * 2 ** (retries - 1))

    async def _post(self, where: str, path: str, body: dict) -> dict:
        for _ in range(MAX_RATE_LIMITED_RETRIES):
            response = await self._send(where, path, body)
            if response.status_code != 429:
                break
            await asyncio.sleep(float(response.headers.get("retry-after", 1)))
        if response.status_code != 200:
            raise EvalRequestError(f"{where}: HTTP {response.status_code}: {_error_detail(response)}")
        return response.json()

    async def sample(self, config: EvalConfig, prompt_index: int, sample: int) -> Sample:
        """Request, read and score sample ``sample`` of prompt ``prompt_index``."""
        record = self.records[prompt_index]
        where = f"config {config.name!r}, prompt {record.id!r} (line {prompt_index + 1}), sample {sample}"
        seed = sample_seed(self.settings, config, prompt_index, sample)
        path, body = request(record, config, self.settings, seed)
        response = await self._post(where, path, body)
        try:
            choice = response["choices"][0]
            text = choice["message"]["content"] if record.is_chat else choice["text"]
            report = choice.get("guidance") or {"kl": 0.0, "steps": 0}
            tokens = response["usage"]["completion_tokens"]
        except (KeyError, IndexError, TypeError) as exc:
            raise EvalRequestError(f"{where}: malformed response ({exc!r}): {str(response)[:500]}") from exc
        text = text or ""
        return Sample(prompt_index=prompt_index, prompt_id=record.id, sample=sample, seed=seed, text=text,
                      reward=self.verifier(verifier_prompt(record), text, record.answer),
                      answer=None if self.extractor is None else self.extractor(text),
                      kl=float(report["kl"]), steps=int(report["steps"]), completion_tokens=int(tokens),
                      score=report.get("score"), generated_tokens=int(report.get("generated_tokens", tokens)))

    async def check(self, configs: Sequence[EvalConfig]) -> None:
        """One request per configuration (sample 0 of the first prompt), so that a configuration the
        server refuses (an unknown guide model, say) fails before the run, not an hour into it."""
        await asyncio.gather(*(self.sample(config, 0, 0) for config in configs))

    async def run(self, config: EvalConfig, bar: tqdm) -> list[Sample]:
        """Every sample of every prompt under ``config``, in (prompt, sample) order."""
        async def one(i: int, j: int) -> Sample:
            result = await self.sample(config, i, j)
            bar.update()
            return result

        return list(await asyncio.gather(*(one(i, j) for i in range(len(self.records))
                                           for j in range(self.settings.samples))))
