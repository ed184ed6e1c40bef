"""The one place that builds and talks to vLLM's engine.

`Engine` wraps vLLM's `AsyncLLM`: it starts it from `Settings` (registering the
guidance logits processor when guide models are configured), streams per-choice
deltas of a request, aborts requests, collects guidance reports and reports
liveness. The HTTP layer never touches vLLM types: it passes `SamplingOptions`
in and gets `ChoiceDelta`s out.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from pydantic import ValidationError
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.engine.async_llm import AsyncLLM

from guidance.adapters.vllm import (
    GUIDANCE_ARG,
    KEY_ARG,
    REPORTS_RPC,
    TIMINGS_RPC,
    WORKER_EXTENSION,
    GuidanceLogitsProcessor,
)
from guidance.adapters.vllm import engine_config as guidance_engine_config
from guidance.batch import GuidanceReport, StepTimings
from guidance.kl_budget import request_budget
from guidance.catalog import GuideCatalog
from guidance.loading import step_model_names
from guidance.search.report import SearchReport
from server.engine_args import ENGINE_ARGS
from server.errors import EngineDead, EngineTimeout, vllm_client_error
from server.machine import resolve_dtype
from server.metrics import observe_guidance
from server.report_batcher import Report, ReportBatcher
from server.settings import Settings
from server.streams import merge
from server.tracking import Stage, current_request, stage

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
    guidance: tuple[dict[str, Any], ...] = ()  # validated entries, see guidance.spec
    # Further `SamplingParams` fields as vLLM derived them from the request (server.api.vllm_fields).
    engine_params: Mapping[str, Any] = field(default_factory=dict)

    def child_params(self, index: int, key: str) -> SamplingParams:
        """Parameters of choice `index`, sampled as its own engine request.

        A seeded request gives choice i the seed `seed + i`, as vLLM does for `n > 1`.
        """
        extra_args = {GUIDANCE_ARG: list(self.guidance), KEY_ARG: key} if self.guidance else None
        return SamplingParams(
            n=1,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
            stop=list(self.stop),
            seed=None if self.seed is None else self.seed + index,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=self.logprobs,
            ignore_eos=self.ignore_eos,
            extra_args=extra_args,
            # A copy per choice: vLLM keeps per-request state in some of them (a grammar's backend).
            **copy.deepcopy(dict(self.engine_params)),
            # Each yielded output carries only what is new since the previous one.
            output_kind=RequestOutputKind.DELTA,
        )


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token (id and text) with its log-probability and the top alternatives,
    each (token id, text, logprob)."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...]


# Per prompt token, the logprobs vLLM computed for it given the tokens before it (None for the
# first token), as vLLM's server returns them: {"<token id>": {"logprob", "rank", "decoded_token"}},
# the prompt's own token and the top `prompt_logprobs` alternatives.
PromptLogprobs = tuple[dict[str, dict[str, Any]] | None, ...]


@dataclass(frozen=True)
class ChoiceDelta:
    """New output of one choice (index) since its previous delta."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None
    guidance: GuidanceReport | None = None  # on a guided choice's last delta
    search: SearchReport | None = None  # on a searched choice's last delta
    prompt_logprobs: PromptLogprobs | None = None  # on the first delta, when asked for


@dataclass
class ChoiceOutput:
    """A choice accumulated from its deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    guidance: GuidanceReport | None = None
    search: SearchReport | None = None
    prompt_logprobs: PromptLogprobs | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs or ())
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.guidance = delta.guidance or self.guidance
        self.search = delta.search or self.search
        self.prompt_logprobs = delta.prompt_logprobs or self.prompt_logprobs


class Engine:
    """Async vLLM engine for one base model and its guide models."""

    def __init__(self, llm: AsyncLLM, max_model_len: int, start_seconds: float, guided: bool,
                 reply_rank: int, rpc_timeout_s: float = 30.0) -> None:
        self._llm = llm
        self.rpc_timeout_s = rpc_timeout_s
        # A worker call timed out: the engine core, which waits for it between steps, may be stuck
        # (server.app.watch_engine then checks that it still answers).
        self.rpc_timed_out = False
        self.max_model_len = max_model_len
        self.max_num_seqs = llm.vllm_config.scheduler_config.max_num_seqs
        self.model_dtype = llm.model_config.dtype  # what the base model runs in ("auto" resolved by vLLM)
        self.start_seconds = start_seconds
        self._guided = guided
        # The worker whose samples vLLM returns (first tensor rank of the last pipeline stage): its
        # guidance reports are the ones of the tokens the client gets.
        self._reply_rank = reply_rank
        self._reports = ReportBatcher(self._fetch_reports)  # one RPC for the requests finishing together

    @classmethod
    def start(cls, settings: Settings, catalog: GuideCatalog) -> "Engine":
        """Build the engine (spawns vLLM's engine-core and worker processes)."""
        args = engine_args(settings, catalog)
        vllm_config = engine_config(args)
        began = time.perf_counter()
        llm = AsyncLLM.from_vllm_config(vllm_config, disable_log_stats=args.disable_log_stats)
        elapsed = time.perf_counter() - began
        max_len = llm.model_config.max_model_len
        parallel = vllm_config.parallel_config
        logger.info("engine started in %.1f s (max_model_len=%d, dtype=%s, tensor_parallel_size=%d, "
                    "pipeline_parallel_size=%d, guide models: %s)", elapsed, max_len,
                    str(llm.model_config.dtype).removeprefix("torch."), parallel.tensor_parallel_size,
                    parallel.pipeline_parallel_size, ", ".join(catalog.names()) or "none")
        return cls(llm, max_len, elapsed, guided=bool(args.logits_processors),
                   reply_rank=parallel.world_size - parallel.tensor_parallel_size, rpc_timeout_s=settings.rpc_timeout_s)

    def check_options(self, options: SamplingOptions) -> None:
        """A 400 with vLLM's message for options vLLM's engine would refuse (a token id out of the
        vocabulary in logit_bias or allowed_token_ids, a grammar that does not compile, ...), so that
        they are refused before the request is admitted or streamed."""
        config = self._llm.vllm_config
        try:
            options.child_params(0, key="check").verify(
                config.model_config, config.speculative_config, config.structured_outputs_config, self._llm.tokenizer)
        except (ValueError, VLLMClientError) as exc:
            raise vllm_client_error(exc) from exc

    def generate(self, request_id: str, prompt_ids: list[int], options: SamplingOptions) -> AsyncIterator[ChoiceDelta]:
        """Stream the deltas of all `options.n` choices of one prompt, as they come.

        Each choice is its own engine request (`<request_id>-<index>`), so each guided
        choice has its own report. Closing the stream (client gone) aborts them all.
        """
        return merge([self._generate_choice(_choice_id(request_id, i), i, prompt_ids, options)
                      for i in range(options.n)])

    async def abort(self, request_id: str, index: int) -> None:
        """Stop choice `index` of a `generate` call: its stream ends with finish_reason "abort", and
        the engine frees its KV blocks and guide-model slot."""
        await self._llm.abort(_choice_id(request_id, index))

    async def _generate_choice(
        self, engine_id: str, index: int, prompt_ids: list[int], options: SamplingOptions
    ) -> AsyncIterator[ChoiceDelta]:
        top_k = options.logprobs
        params = options.child_params(index, key=engine_id)
        record = current_request()
        if record is not None:
            record.engine_ids.add(engine_id)
        try:
            async for output in self._llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, engine_id):
                if record is not None:
                    record.progress()
                for choice in output.outputs:
                    delta = ChoiceDelta(
                        index=index,
                        text=choice.text,
                        token_ids=tuple(choice.token_ids),
                        logprobs=None if top_k is None else _token_logprobs(choice, top_k),
                        finish_reason=choice.finish_reason,
                        prompt_logprobs=None if output.prompt_logprobs is None else
                        _prompt_logprobs(output.prompt_logprobs),
                    )
                    if delta.finish_reason is not None and options.guidance:
                        with stage(Stage.WAITING_REPORT):
                            delta = replace(delta, guidance=await self._guidance_report(engine_id, options))
                    yield delta
        except EngineDeadError as exc:
            raise EngineDead() from exc
        finally:
            if record is not None:
                record.engine_ids.discard(engine_id)
            if self.alive:  # no-op for a finished request; stops an abandoned one (a dead engine holds none)
                await self._llm.abort(engine_id)

    async def _guidance_report(self, key: str, options: SamplingOptions) -> GuidanceReport:
        """The worker's KL report of a finished guided request (zero if it was never guided)."""
        kl, steps, scale = await self._reports.get(key)
        observe_guidance([entry["type"] for entry in options.guidance], kl, steps)
        budget = request_budget(options.guidance)
        return GuidanceReport(  # a msgpack'd scale arrives as a list
            kl=kl, steps=steps, scale=None if budget is None or scale is None else tuple(scale), budget=budget,
            caps=tuple(entry["strength"] for entry in options.guidance) if budget is not None else ())

    async def _fetch_reports(self, keys: list[str]) -> dict[str, Report]:
        return (await self._worker_call(REPORTS_RPC, "the KL report of guided requests", (keys,)))[self._reply_rank]

    async def _worker_call(self, method: str, what: str, args: tuple = ()) -> list[Any]:
        """vLLM's collective RPC to the workers, bounded by `rpc_timeout_s` (EngineTimeout past it, EngineDead
        when the engine died)."""
        try:
            return await asyncio.wait_for(self._llm.collective_rpc(method, args=args), self.rpc_timeout_s)
        except EngineDeadError as exc:
            raise EngineDead() from exc
        except TimeoutError as exc:
            self.rpc_timed_out = True
            raise EngineTimeout(f"The engine's workers did not answer within {self.rpc_timeout_s:g} s ({what}); "
                                "retry the request.") from exc

    async def guidance_timings(self) -> StepTimings | None:
        """The worker's cumulative guidance step timings (None without guide models)."""
        if not self._guided:
            return None
        timings = (await self._worker_call(TIMINGS_RPC, "guidance timings"))[self._reply_rank]
        return None if timings is None else StepTimings(**timings)

    async def check_health(self) -> None:
        """Raise if the engine core is dead."""
        await self._llm.check_health()

    @property
    def alive(self) -> bool:
        return not self._llm.errored

    async def responds(self) -> bool:
        """Whether the engine core answers a call of its own (one round trip between its steps) within
        `rpc_timeout_s`; after that, it no longer counts as suspect."""
        try:
            await asyncio.wait_for(self._llm.is_sleeping(), self.rpc_timeout_s)
        except (TimeoutError, EngineDeadError):
            return False
        self.rpc_timed_out = False
        return True

    def holds(self, engine_ids: Iterable[str]) -> bool:
        """Whether the engine holds any of these requests (queued, running, or with output not yet read)."""
        held = self._llm.output_processor.external_req_ids
        return any(held.get(engine_id) for engine_id in engine_ids)

    @property
    def num_unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests()

    def shutdown(self) -> None:
        self._llm.shutdown()


def _choice_id(request_id: str, index: int) -> str:
    return f"{request_id}-{index}"


class EngineSettingsError(ValueError):
    """vLLM refuses the engine settings (its message, with the settings that were set)."""


def engine_args(settings: Settings, catalog: GuideCatalog) -> AsyncEngineArgs:
    """vLLM's engine arguments for the settings: the pass-through table (server.engine_args), plus what
    the service itself needs (memory, the guidance logits processor when guide models are configured)."""
    if settings.pipeline_parallel_size > 1 and not torch.cuda.is_available():
        # Measured with vLLM 0.32 on the demo model, guided or not (docs/guidance.md).
        raise EngineSettingsError(
            f"pipeline_parallel_size={settings.pipeline_parallel_size} on CPU: vLLM's CPU backend starts, then its "
            "engine core dies at the first request (AssertionError in sync_and_gather_intermediate_tensors on the "
            "last stage, then KeyError on the request id); use tensor_parallel_size on CPU")
    guided: dict[str, Any] = {}
    if step_model_names(catalog):
        if settings.data_parallel_size > 1:
            # vLLM's AsyncLLM sends collective RPCs to one engine core only, so the KL report of a
            # request served by another would be lost.
            raise EngineSettingsError("data_parallel_size > 1 with guide models: a guided request's KL report is "
                                      "read from one data-parallel engine only; scale out with replicas instead")
        # vLLM runs this hook in our process per request; give it the table to check names.
        GuidanceLogitsProcessor.catalog = catalog
        guided = dict(
            logits_processors=[GuidanceLogitsProcessor],
            additional_config=guidance_engine_config(catalog, settings.guide_dtype, settings.guide_kv_cache_space_gib),
            worker_extension_cls=WORKER_EXTENSION,
            # The guide models must see each sampled token before the next step; async
            # scheduling hands processors placeholder ids instead.
            async_scheduling=False,
        )
        if torch.cuda.is_available():
            # CUDA builds default to Model Runner V2, which rejects V1 logits processors.
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
            logger.info("guidance: set VLLM_USE_V2_MODEL_RUNNER=0 (V1 logits-processor interface)")
    passed = {name: getattr(settings, name) for name in ENGINE_ARGS}
    return AsyncEngineArgs(
        model=str(settings.model),
        served_model_name=settings.model_name,
        dtype=resolve_dtype(settings.dtype),
        max_model_len=settings.max_model_len,
        kv_cache_memory_bytes=int(settings.kv_cache_space_gib * GIB),
        # Ignore sampling defaults in the model's generation_config.json: a request's
        # parameters are the only ones that apply, as with the OpenAI API.
        generation_config="vllm",
        # vLLM's stat logger feeds its Prometheus metrics (vllm:*), served at /metrics.
        disable_log_stats=False,
        # On CPU, a seeded request whose prompt is prefilled in chunks kills the engine core: vLLM
        # rewinds the request's generator after the discarded partial-prefill sample, and CPU
        # generators have no offset ("CPU Generator does not use offset"). Whole prefills avoid it.
        enable_chunked_prefill=torch.cuda.is_available(),
        **passed,
        **guided,
    )


def engine_config(args: AsyncEngineArgs) -> VllmConfig:
    """vLLM's own check of the whole combination, before any process starts."""
    defaults = AsyncEngineArgs(model=args.model)
    # Named before vLLM fills in its choices (it writes them into `args`).
    chosen = ", ".join(f"{name}={getattr(args, name)!r}" for name in ENGINE_ARGS
                       if getattr(args, name) != getattr(defaults, name))
    try:
        return args.create_engine_config(UsageContext.ENGINE_CONTEXT)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise EngineSettingsError(
            f"vLLM rejects the engine settings ({chosen or 'vLLM defaults'}): {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    """vLLM's message; for its pydantic config checks, each error's field and message on one line."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    return "; ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}" if error["loc"] else error["msg"]
                     for error in exc.errors())


def _prompt_logprobs(positions) -> PromptLogprobs:
    """vLLM's per-position prompt logprobs (None or {token id: Logprob}) as plain data."""
    return tuple(
        None if position is None else {
            str(token_id): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
            for token_id, lp in position.items()
        }
        for position in positions
    )


def _token_logprobs(choice, top_k: int) -> tuple[TokenLogprob, ...]:
    """Pair each generated token with its logprob and the `top_k` most likely tokens.

    vLLM returns, per position, the top-k tokens (ranks 1..k) plus the sampled
    token, whose rank may be larger than k.
    """
    entries = []
    for token_id, position in zip(choice.token_ids, choice.logprobs or ()):
        sampled = position[token_id]
        top = sorted((lp.rank, top_id, lp.decoded_token or "", lp.logprob) for top_id, lp in position.items()
                     if lp.rank is not None and lp.rank <= top_k)
        entries.append(TokenLogprob(
            token_id=token_id,
            token=sampled.decoded_token or "",
            logprob=sampled.logprob,
            top=tuple((top_id, token, logprob) for _, top_id, token, logprob in top),
        ))
    return tuple(entries)
