"""The one place that builds and talks to vLLM's engine.

`Engine` wraps vLLM's `AsyncLLM`: it starts it from `Settings`, streams
per-choice deltas of a request, aborts requests and reports liveness. The
HTTP layer never touches vLLM types: it passes `SamplingOptions` in and gets
`ChoiceDelta`s out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from server.settings import Settings

logger = logging.getLogger(__name__)

GIB = 1 << 30


@dataclass(frozen=True)
class SamplingOptions:
    """Output-affecting parameters of one request, independent of the endpoint."""

    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    ignore_eos: bool = False

    def to_vllm(self) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
            stop=list(self.stop),
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=self.logprobs,
            ignore_eos=self.ignore_eos,
            # Each yielded output carries only what is new since the previous one.
            output_kind=RequestOutputKind.DELTA,
        )


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability and the top alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class ChoiceDelta:
    """New output of one choice (index) since its previous delta."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None


class Engine:
    """Async vLLM engine for one base model."""

    def __init__(self, llm: AsyncLLM, max_model_len: int, start_seconds: float) -> None:
        self._llm = llm
        self.max_model_len = max_model_len
        self.start_seconds = start_seconds

    @classmethod
    def start(cls, settings: Settings) -> "Engine":
        """Build the engine (spawns vLLM's engine-core and worker processes)."""
        args = AsyncEngineArgs(
            model=str(settings.model),
            served_model_name=settings.model_name,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            seed=settings.seed,
            kv_cache_memory_bytes=int(settings.kv_cache_space_gib * GIB),
            # CUDA graphs and torch.compile cost minutes at start for no gain on small models.
            enforce_eager=True,
            # Ignore sampling defaults in the model's generation_config.json: a request's
            # parameters are the only ones that apply, as with the OpenAI API.
            generation_config="vllm",
            disable_log_stats=True,
        )
        began = time.perf_counter()
        llm = AsyncLLM.from_engine_args(args)
        elapsed = time.perf_counter() - began
        max_len = llm.model_config.max_model_len
        logger.info("engine started in %.1f s (max_model_len=%d)", elapsed, max_len)
        return cls(llm, max_len, elapsed)

    async def generate(
        self, request_id: str, prompt_ids: list[int], options: SamplingOptions
    ) -> AsyncIterator[ChoiceDelta]:
        """Stream the deltas of all `options.n` choices of one prompt.

        Cancelling the iteration (client gone) aborts the request in the engine.
        """
        top_k = options.logprobs
        try:
            async for output in self._llm.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), options.to_vllm(), request_id
            ):
                for choice in output.outputs:
                    yield ChoiceDelta(
                        index=choice.index,
                        text=choice.text,
                        token_ids=tuple(choice.token_ids),
                        logprobs=None if top_k is None else _token_logprobs(choice, top_k),
                        finish_reason=choice.finish_reason,
                    )
        finally:
            # No-op for a finished request; stops an abandoned one.
            await self._llm.abort(request_id)

    async def check_health(self) -> None:
        """Raise if the engine core is dead."""
        await self._llm.check_health()

    @property
    def alive(self) -> bool:
        return not self._llm.errored

    @property
    def num_unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests()

    def shutdown(self) -> None:
        self._llm.shutdown()


def _token_logprobs(choice, top_k: int) -> tuple[TokenLogprob, ...]:
    """Pair each generated token with its logprob and the `top_k` most likely tokens.

    vLLM returns, per position, the top-k tokens (ranks 1..k) plus the sampled
    token, whose rank may be larger than k.
    """
    entries = []
    for token_id, position in zip(choice.token_ids, choice.logprobs or ()):
        sampled = position[token_id]
        top = sorted((lp.rank, lp.decoded_token or "", lp.logprob) for lp in position.values()
                     if lp.rank is not None and lp.rank <= top_k)
        entries.append(TokenLogprob(
            token=sampled.decoded_token or "",
            logprob=sampled.logprob,
            top=tuple((token, logprob) for _, token, logprob in top),
        ))
    return tuple(entries)
