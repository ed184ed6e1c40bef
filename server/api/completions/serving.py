"""Logic of POST /v1/completions: prompts to engine requests to OpenAI responses."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from guidance.spec import ResolvedGuidance
from server.api.choices import ChoiceCollector, guidance_report, guidance_summary, usage
from server.api.common import check_n, completion_budget
from server.api.completions.protocol import CompletionRequest
from server.api.streaming import SSE_DONE, sse
from server.streams import merge, tagged
from server.engine import ChoiceDelta, SamplingOptions, TokenLogprob
from server.errors import APIError, api_error_body
from server.services import Services


@dataclass(frozen=True)
class PreparedPrompt:
    token_ids: list[int]
    text: str
    options: SamplingOptions


class CompletionServing:
    def __init__(self, services: Services) -> None:
        self._services = services

    def prepare(self, request: CompletionRequest) -> tuple[list[PreparedPrompt], list[ResolvedGuidance]]:
        """Validate the request against the model and tokenize its prompts (all errors are 400s)."""
        services = self._services
        services.check_model(request.model)
        check_n(request.n, services.settings.max_n)
        guidance = services.resolve_guidance(request.guidance)
        prompts = request.prompts()
        prepared = []
        for i, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(prompt, str):
                token_ids, text = services.renderer.encode(prompt), prompt
            else:
                token_ids = services.renderer.check_token_ids(prompt, param)
                text = services.renderer.decode(prompt)
            max_tokens = completion_budget(
                len(token_ids), request.max_tokens, services.engine.max_model_len,
                prompt_param=param, max_tokens_param="max_tokens",
            )
            options = request.sampling_options(max_tokens, request.logprobs, guidance)
            prepared.append(PreparedPrompt(token_ids, text, options))
        return prepared, guidance

    def _deltas(self, request_id: str, prompts: list[PreparedPrompt], n: int) -> AsyncIterator[tuple[int, ChoiceDelta]]:
        """Deltas of every prompt's choices; the choice index is prompt_index * n + i."""
        engine = self._services.engine
        streams = [
            tagged(i * n, engine.generate(f"{request_id}-{i}", p.token_ids, p.options))
            for i, p in enumerate(prompts)
        ]
        return merge(streams)

    async def complete(
        self, request: CompletionRequest, prompts: list[PreparedPrompt], guidance: list[ResolvedGuidance]
    ) -> dict:
        request_id, created = _new_id(), int(time.time())
        collector = ChoiceCollector()
        async for offset, delta in self._deltas(request_id, prompts, request.n):
            collector.add(offset + delta.index, delta)
        choices = []
        for index, choice in collector.sorted():
            prefix = prompts[index // request.n].text if request.echo else ""
            choices.append({
                "index": index,
                "text": prefix + choice.text,
                "logprobs": _logprobs(choice.logprobs, len(prefix)) if request.logprobs is not None else None,
                "finish_reason": choice.finish_reason,
            })
            if guidance:
                choices[-1]["guidance"] = guidance_report(choice.guidance)
        response = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": request.model,
            "choices": choices,
            "usage": usage(_prompt_tokens(prompts), collector.completion_tokens),
        }
        if guidance:
            response["guidance"] = guidance_summary(guidance)
        return response

    async def stream(
        self, request: CompletionRequest, prompts: list[PreparedPrompt], guidance: list[ResolvedGuidance]
    ) -> AsyncIterator[str]:
        request_id, created = _new_id(), int(time.time())
        collector = ChoiceCollector()
        text_offsets: dict[int, int] = {}

        def chunk(choices: list[dict]) -> dict:
            return {"id": request_id, "object": "text_completion", "created": created,
                    "model": request.model, "choices": choices}

        try:
            async for offset, delta in self._deltas(request_id, prompts, request.n):
                index = offset + delta.index
                text = delta.text
                if request.echo and index not in collector.choices:
                    text = prompts[index // request.n].text + text
                collector.add(index, delta)
                choice = {"index": index, "text": text, "logprobs": None, "finish_reason": delta.finish_reason}
                if request.logprobs is not None:
                    start = text_offsets.get(index, len(text) - len(delta.text))
                    choice["logprobs"] = _logprobs(list(delta.logprobs or ()), start)
                    text_offsets[index] = start + len(delta.text)
                if guidance and delta.finish_reason is not None:
                    choice["guidance"] = guidance_report(delta.guidance)
                yield sse(chunk([choice]))
            if request.include_usage_in_stream:
                final = chunk([])
                final["usage"] = usage(_prompt_tokens(prompts), collector.completion_tokens)
                yield sse(final)
        except APIError as exc:
            yield sse(api_error_body(exc))
        yield SSE_DONE


def _new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def _prompt_tokens(prompts: list[PreparedPrompt]) -> int:
    return sum(len(p.token_ids) for p in prompts)


def _logprobs(tokens: list[TokenLogprob], text_offset: int) -> dict:
    """The completions endpoint's logprobs object, offsets counted in characters of the returned text."""
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": offsets,
    }
