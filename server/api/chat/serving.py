"""Logic of POST /v1/chat/completions: messages to one engine request to OpenAI chat completions."""

from __future__ import annotations

from server.api.chat.protocol import ChatCompletionRequest
from server.api.choices import guidance_report
from server.api.common import check_n, completion_budget
from server.api.generation import GenerationServing, Prepared, PreparedPrompt
from server.engine import ChoiceDelta, ChoiceOutput, TokenLogprob


class ChatServing(GenerationServing):
    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def prepare(self, body: ChatCompletionRequest) -> Prepared:
        services = self.services
        services.check_model(body.model)
        check_n(body.n, services.settings.max_n)
        guidance = services.resolve_guidance(body.guidance)
        search = services.resolve_search(body.search)
        limit, limit_param = body.completion_limit
        services.check_max_tokens(limit, limit_param)
        prompt_ids = services.renderer.render_chat([m.template_message() for m in body.messages])
        max_tokens = completion_budget(
            len(prompt_ids), limit, services.engine.max_model_len,
            prompt_param="messages", max_tokens_param=limit_param, limit=services.settings.max_tokens_limit,
        )
        services.check_search_fits(search, len(prompt_ids), max_tokens, limit_param)
        options = body.sampling_options(max_tokens, body.num_logprobs, guidance)
        return Prepared([PreparedPrompt(prompt_ids, "", options)], guidance, search)

    def opening_choices(self, body: ChatCompletionRequest, prepared: Prepared) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(body.n)]

    def choice(self, body: ChatCompletionRequest, prepared: Prepared, index: int, choice: ChoiceOutput) -> dict:
        result = {
            "index": index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": _logprobs(choice.logprobs) if body.logprobs else None,
            "finish_reason": choice.finish_reason,
        }
        if prepared.reports:
            result["guidance"] = guidance_report(choice.guidance, choice.search)
        return result

    def chunk_choice(self, body: ChatCompletionRequest, prepared: Prepared, index: int, delta: ChoiceDelta,
                     previous_text: str | None) -> dict:
        result = {
            "index": index,
            "delta": {"content": delta.text} if delta.text else {},
            "logprobs": _logprobs(list(delta.logprobs or ())) if body.logprobs else None,
            "finish_reason": delta.finish_reason,
        }
        if prepared.reports and delta.finish_reason is not None:
            result["guidance"] = guidance_report(delta.guidance, delta.search)
        return result

    def replay_choices(self, body: ChatCompletionRequest, choice: dict) -> list[dict]:
        replayed = {"index": choice["index"], "delta": {"content": choice["message"]["content"]},
                    "logprobs": choice["logprobs"], "finish_reason": choice["finish_reason"]}
        if "guidance" in choice:
            replayed["guidance"] = choice["guidance"]
        return [replayed]


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
