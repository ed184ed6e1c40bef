"""Logic of POST /v1/chat/completions: messages to one engine request to OpenAI responses."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from server.api.chat.protocol import ChatCompletionRequest
from guidance.spec import ResolvedGuidance
from server.api.choices import ChoiceCollector, guidance_report, guidance_summary, usage
from server.api.common import check_n, completion_budget
from server.api.streaming import SSE_DONE, sse
from server.engine import SamplingOptions, TokenLogprob
from server.errors import APIError, api_error_body
from server.services import Services


class ChatServing:
    def __init__(self, services: Services) -> None:
        self._services = services

    def prepare(self, request: ChatCompletionRequest) -> tuple[list[int], SamplingOptions, list[ResolvedGuidance]]:
        """Validate the request against the model and render its messages (all errors are 400s)."""
        services = self._services
        services.check_model(request.model)
        check_n(request.n, services.settings.max_n)
        guidance = services.resolve_guidance(request.guidance)
        prompt_ids = services.renderer.render_chat([m.template_message() for m in request.messages])
        limit, limit_param = request.completion_limit
        max_tokens = completion_budget(
            len(prompt_ids), limit, services.engine.max_model_len,
            prompt_param="messages", max_tokens_param=limit_param,
        )
        return prompt_ids, request.sampling_options(max_tokens, request.num_logprobs, guidance), guidance

    async def complete(
        self, request: ChatCompletionRequest, prompt_ids: list[int], options: SamplingOptions,
        guidance: list[ResolvedGuidance],
    ) -> dict:
        request_id, created = _new_id(), int(time.time())
        collector = ChoiceCollector()
        async for delta in self._services.engine.generate(request_id, prompt_ids, options):
            collector.add(delta.index, delta)
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": _logprobs(choice.logprobs) if request.logprobs else None,
                "finish_reason": choice.finish_reason,
            }
            for index, choice in collector.sorted()
        ]
        response = {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": request.model,
            "choices": choices,
            "usage": usage(len(prompt_ids), collector.completion_tokens),
        }
        if guidance:
            for choice, (_, collected) in zip(choices, collector.sorted()):
                choice["guidance"] = guidance_report(collected.guidance)
            response["guidance"] = guidance_summary(guidance)
        return response

    async def stream(
        self, request: ChatCompletionRequest, prompt_ids: list[int], options: SamplingOptions,
        guidance: list[ResolvedGuidance],
    ) -> AsyncIterator[str]:
        request_id, created = _new_id(), int(time.time())
        collector = ChoiceCollector()

        def chunk(choices: list[dict]) -> dict:
            return {"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": request.model, "choices": choices}

        try:
            for index in range(request.n):
                role = {"role": "assistant", "content": ""}
                yield sse(chunk([{"index": index, "delta": role, "logprobs": None, "finish_reason": None}]))
            async for delta in self._services.engine.generate(request_id, prompt_ids, options):
                collector.add(delta.index, delta)
                choice = {
                    "index": delta.index,
                    "delta": {"content": delta.text} if delta.text else {},
                    "logprobs": _logprobs(list(delta.logprobs or ())) if request.logprobs else None,
                    "finish_reason": delta.finish_reason,
                }
                if guidance and delta.finish_reason is not None:
                    choice["guidance"] = guidance_report(delta.guidance)
                yield sse(chunk([choice]))
            if request.include_usage_in_stream:
                final = chunk([])
                final["usage"] = usage(len(prompt_ids), collector.completion_tokens)
                yield sse(final)
        except APIError as exc:
            yield sse(api_error_body(exc))
        yield SSE_DONE


def _new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _logprobs(tokens: list[TokenLogprob]) -> dict:
    """The chat endpoint's logprobs object."""

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(t.token, t.logprob), "top_logprobs": [entry(tok, lp) for tok, lp in t.top]}
            for t in tokens
        ]
    }
