"""A scorer served on its own engine, reached by URL: vLLM's pooling API (``/classify``, ``/pooling``).

A guide-model table entry that is an object with a ``url`` names one (``RemoteScorerConfig``)::

    {"rm": {"url": "http://reward:8000", "api": "classify", "model": "rm", "timeout_s": 10, "retries": 2}}

What is sent, in vLLM 0.32's shapes (``vllm.entrypoints.pooling``), by the entry's ``format``:

- ``messages`` (the default), for a chat request: the reward model renders the conversation with its
  own chat template; vLLM's chat-style pooling request holds one conversation, so each candidate is
  one POST ``{"model", "messages": [..., {"role": "assistant", "content": completion}],
  "use_activation"}``, all sent at once on the pooled connections. A completion request is sent as
  ``text``.
- ``text``: one POST for all candidates, ``{"model", "input": [prompt + completion, ...],
  "add_special_tokens": false, "use_activation"}``: the prompt as the base model's tokens spell it
  (special tokens and, for chat, the base model's chat template included), so none are added twice.
- ``token_ids``: one POST for all candidates, ``{"model", "input": [prompt ids + completion ids, ...],
  "use_activation"}``: exactly the tokens an embedded scorer reads (the completion's end-of-sequence
  token included); the reward model must share the base model's tokenizer.

What is read: ``/classify`` answers ``{"data": [{"index", "probs": [...]}]}``, ``/pooling``
``{"data": [{"index", "data": [...]}]}``; the score is entry ``score_index`` of that vector. By
default ``use_activation`` is false, so a one-label reward model gives its raw reward (the logit),
as an embedded reward head does; true gives vLLM's activation (sigmoid for one label, softmax over
several).

Failures (``RemoteScorerError``): a connection error, a dropped connection or a 5xx is retried
``retries`` times with doubling backoff (scoring is a pure function, so a repeat is safe), then
raises ``ScorerUnreachable``; a read past ``timeout_s`` raises ``ScorerTimedOut`` at once (a slow
scorer stays slow); a 4xx or an answer without one score per candidate raises ``ScorerBadResponse``.
Each names the scorer and its URL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from guidance.search.scorers import Completion, Conversation, Scorer

RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
# Most chat-style requests one scorer has on the wire at once (best-of-N posts one per candidate).
MAX_PARALLEL_POSTS = 16


class RemoteScorerConfig(BaseModel):
    """A guide-model table entry naming a scorer served by URL."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="Base URL of the pooling server, e.g. http://reward:8000 (no path).")
    api: Literal["classify", "pooling"] = Field("classify", description="vLLM endpoint: /classify or /pooling.")
    model: str | None = Field(None, min_length=1, description="Served model name sent in each request.")
    timeout_s: float = Field(10.0, gt=0, description="Timeout of each phase of one HTTP attempt (connect, send, read).")
    retries: int = Field(2, ge=0, le=10, description="Repeats after a connection error or a 5xx.")
    backoff_s: float = Field(0.1, ge=0, le=10, description="Wait before the first repeat; doubled per repeat.")
    use_activation: bool = Field(False, description="Ask for vLLM's activation (sigmoid/softmax) of the output.")
    score_index: int = Field(0, ge=0, description="Which entry of each output vector is the score.")
    format: Literal["messages", "text", "token_ids"] = Field(
        "messages", description="What is sent: a chat request's messages (rendered by the reward model's chat "
        "template; others as text), the text as the base model's tokens spell it, or those token ids.")
    api_key_env: str | None = Field(
        None, min_length=1, description="Environment variable holding a Bearer key for the scorer (never the key).")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL with a host, got {url!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"must be the server's base URL without a path (the endpoint path is added), got {url!r}")
        if parts.username or parts.password:
            raise ValueError("must not hold credentials; name an environment variable in api_key_env")
        return url.rstrip("/")

    @property
    def endpoint(self) -> str:
        return f"{self.url}/{self.api}"

    @property
    def host(self) -> str:
        """host[:port] of the URL, for listings and error messages."""
        return urlsplit(self.url).netloc


def read_remote_entry(name: str, entry: Any, environ: Mapping[str, str]) -> tuple[RemoteScorerConfig, str | None]:
    """A table entry as a RemoteScorerConfig and its API key (from `environ`, when it names a variable);
    ValueError naming the scorer and the field otherwise."""
    try:
        config = RemoteScorerConfig.model_validate(entry)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "entry"
        message = error["msg"].removeprefix("Value error, ")
        raise ValueError(f"{name}.{field}: {message}") from None
    if config.api_key_env is None:
        return config, None
    api_key = environ.get(config.api_key_env)
    if not api_key:
        raise ValueError(f"{name}.api_key_env: the environment variable {config.api_key_env} is not set")
    return config, api_key


class RemoteScorerError(Exception):
    """A remote scorer gave no scores; the message names the scorer and its URL."""

    def __init__(self, scorer: str, message: str) -> None:
        super().__init__(message)
        self.scorer = scorer


class ScorerUnreachable(RemoteScorerError):
    """Connection failures or 5xx answers on every attempt."""


class ScorerTimedOut(RemoteScorerError):
    """An attempt did not get its answer within the entry's timeout_s."""


class ScorerBadResponse(RemoteScorerError):
    """The scorer refused the request (4xx) or its answer holds no score per candidate."""


class RemoteScorer(Scorer):
    kind = "remote"
    reads_conversation = True

    def __init__(self, name: str, config: RemoteScorerConfig, api_key: str | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        """`api_key`: sent as a Bearer token; `transport`: httpx's (tests pass a mock one)."""
        self.name, self.config = name, config
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # One pooled client per scorer: keep-alive connections are shared by the scoring threads.
        self._client = httpx.Client(timeout=config.timeout_s, headers=headers, transport=transport,
                                    limits=httpx.Limits(max_connections=MAX_PARALLEL_POSTS * 2))
        self._posts = ThreadPoolExecutor(max_workers=MAX_PARALLEL_POSTS, thread_name_prefix=f"scorer-{name}")
        self._counts_lock = threading.Lock()
        self._attempts: dict[str, int] = {}

    def score(self, prompt_text: str, prompt_ids: Sequence[int], completions: Sequence[Completion],
              reference: Any = None, conversation: Conversation | None = None) -> list[float]:
        form = self.config.format
        if form == "messages" and conversation is not None:
            bodies = [self._body(messages=conversation.with_reply(c.text)) for c in completions]
            return [scores[0] for scores in self._posts.map(lambda body: self._post(body, 1), bodies)]
        if form == "token_ids":
            body = self._body(input=[[*prompt_ids, *c.token_ids] for c in completions])
        else:
            body = self._body(input=[prompt_text + c.text for c in completions], add_special_tokens=False)
        return self._post(body, len(completions))

    def attempts(self) -> dict[str, int]:
        """HTTP attempts so far by outcome (ok, retried, timeout, unreachable, bad_response)."""
        with self._counts_lock:
            return dict(self._attempts)

    def describe(self) -> dict[str, Any]:
        config = self.config
        return {**super().describe(), "host": config.host, "api": config.api, "model": config.model,
                "format": config.format}

    def identity(self) -> str:
        """What its scores depend on, for cache keys: the endpoint, the served model, how it reads."""
        config = self.config
        return (f"{config.endpoint} model={config.model} activation={config.use_activation} "
                f"index={config.score_index} format={config.format}")

    def close(self) -> None:
        self._posts.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def _body(self, **payload: Any) -> dict[str, Any]:
        body = {**payload, "use_activation": self.config.use_activation}
        if self.config.model is not None:
            body["model"] = self.config.model
        return body

    def _post(self, body: dict[str, Any], expected: int) -> list[float]:
        """One score per item of `body` (`expected` of them), retrying per the module docstring."""
        config = self.config
        where = f"the scorer {self.name!r} at {config.endpoint}"
        for attempt in range(config.retries + 1):
            if attempt:
                time.sleep(config.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._client.post(config.endpoint, json=body)
            except httpx.TimeoutException as exc:
                if not isinstance(exc, httpx.ConnectTimeout):
                    self._count("timeout")
                    raise ScorerTimedOut(self.name, f"{where} did not answer within {config.timeout_s:g} s "
                                                    "(its timeout_s)") from exc
                failure = f"connect timeout ({exc})"
            except httpx.TransportError as exc:
                failure = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.status_code not in RETRYABLE_STATUS:
                    break
                failure = f"HTTP {response.status_code}"
            if attempt < config.retries:
                self._count("retried")
        else:
            self._count("unreachable")
            raise ScorerUnreachable(self.name, f"{where} is unavailable: {failure} "
                                               f"({config.retries + 1} attempts)")
        try:
            scores = self._read(response, expected)
        except ScorerBadResponse:
            self._count("bad_response")
            raise
        self._count("ok")
        return scores

    def _read(self, response: httpx.Response, expected: int) -> list[float]:
        config = self.config
        where = f"the scorer {self.name!r} at {config.endpoint}"
        if response.status_code != 200:
            raise ScorerBadResponse(self.name, f"{where} answered HTTP {response.status_code}: "
                                               f"{response.text[:300]}")
        try:
            data = sorted(response.json()["data"], key=lambda item: item["index"])
            vectors = [item["probs"] if config.api == "classify" else item["data"] for item in data]
            scores = [float(vector[config.score_index]) for vector in vectors]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ScorerBadResponse(
                self.name, f"{where} gave an answer with no score at index {config.score_index} per item "
                           f"({type(exc).__name__}: {exc}): {response.text[:300]}") from exc
        if len(scores) != expected:
            raise ScorerBadResponse(self.name, f"{where} gave {len(scores)} scores for {expected} inputs")
        return scores

    def _count(self, outcome: str) -> None:
        with self._counts_lock:
            self._attempts[outcome] = self._attempts.get(outcome, 0) + 1


def load_remote_scorers(entries: Mapping[str, Any], environ: Mapping[str, str]) -> list[RemoteScorer]:
    """The remote scorers of a guide-model table's URL entries (``{name: {"url": ...}}``)."""
    return [RemoteScorer(name, *read_remote_entry(name, entry, environ)) for name, entry in sorted(entries.items())]

