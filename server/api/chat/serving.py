"""Logic of POST /v1/chat/completions: messages to one engine request to OpenAI chat completions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest

from guidance.search.scorers import Conversation
from server.api.chat.protocol import ChatCompletionRequest
from server.api.choices import ChoiceCollector, guidance_report, token_name
from server.api.common import check_n, completion_budget, truncate_prompt
from server.api.generation import GenerationServing, Prepared, PreparedPrompt
from server.engine import ChoiceDelta, ChoiceOutput, TokenLogprob
from server.prompts import ChatTemplateOptions
from server.tool_calls import ToolSession


@dataclass
class ChatPrepared(Prepared):
    tools: ToolSession | None = None  # the request offers tools the model may call


class ChatServing(GenerationServing):
    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def prepare(self, body: ChatCompletionRequest) -> ChatPrepared:
        services = self.services
        services.check_model(body.model)
        check_n(body.n, services.settings.max_n)
        guidance = services.resolve_guidance(body.guidance, body.kl_budget)
        search = services.resolve_search(body.search)
        limit, limit_param = body.completion_limit
        services.check_max_tokens(limit, limit_param)
        vllm_request = body.as_vllm_request()
        tools = services.tools.session(vllm_request)
        prompt_ids = self.render(body, vllm_request)
        if body.truncate_prompt_tokens is not None:
            prompt_ids = truncate_prompt(prompt_ids, body.truncate_prompt_tokens, services.engine.max_model_len)
        max_tokens = completion_budget(
            len(prompt_ids), limit, services.engine.max_model_len,
            prompt_param="messages", max_tokens_param=limit_param, limit=services.settings.max_tokens_limit,
        )
        services.check_search_fits(search, len(prompt_ids), max_tokens, limit_param)
        options = body.sampling_options(max_tokens, body.num_logprobs, guidance,
                                        tools.request if tools is not None else vllm_request)
        conversation = None if search is None else Conversation(
            tuple(m.model_dump(mode="json", exclude_none=True) for m in body.messages),
            continues_last=body.continue_final_message)
        return ChatPrepared([PreparedPrompt(prompt_ids, "", options, conversation)], guidance, search,
                            budget=body.kl_budget, tools=tools)

    def render(self, body: ChatCompletionRequest, vllm_request: VllmChatRequest) -> list[int]:
        """The prompt's token ids: the chat template applied to the messages, with the tools (as vLLM
        read them, and a tool parser may have adjusted them) and the documents."""
        template = ChatTemplateOptions(
            tools=[tool.model_dump(exclude_none=True) for tool in vllm_request.tools or ()] or None,
            documents=body.documents,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            template_kwargs=body.chat_template_kwargs or {},
        )
        return self.services.renderer.render_chat(body.template_messages(), template)

    def response(self, body: ChatCompletionRequest, prepared: ChatPrepared, collector: ChoiceCollector,
                 request_id: str, created: int) -> dict:
        response = super().response(body, prepared, collector, request_id, created)
        if body.prompt_logprobs is not None:  # vLLM's server gives them once, beside the choices
            response["prompt_logprobs"] = next((c.prompt_logprobs for _, c in collector.sorted()), None)
        return response

    def opening_choices(self, body: ChatCompletionRequest, prepared: ChatPrepared) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(body.n)]

    def prompt_fields(self, body: ChatCompletionRequest, prepared: ChatPrepared) -> dict:
        # vLLM's server gives the templated prompt's token ids beside the choices, not in each.
        return {"prompt_token_ids": prepared.prompts[0].token_ids} if body.return_token_ids else {}

    def choice(self, body: ChatCompletionRequest, prepared: ChatPrepared, index: int, choice: ChoiceOutput) -> dict:
        message: dict = {"role": "assistant", "content": choice.text}
        finish_reason = choice.finish_reason
        if prepared.tools is not None:
            content, calls = prepared.tools.parse(choice.text, choice.token_ids)
            message = {"role": "assistant", "content": content, "tool_calls": calls}
            finish_reason = prepared.tools.finish_reason(finish_reason, called=bool(calls))
        result = {
            "index": index,
            "message": message,
            "logprobs": _logprobs(choice.logprobs, body.return_tokens_as_token_ids) if body.logprobs else None,
            "finish_reason": finish_reason,
        }
        if prepared.reports:
            result["guidance"] = guidance_report(choice.guidance, choice.search)
        return result

    def chunk_choice(self, body: ChatCompletionRequest, prepared: ChatPrepared, index: int, delta: ChoiceDelta,
                     previous_text: str | None) -> dict:
        message = {"content": delta.text} if delta.text else {}
        finish_reason = delta.finish_reason
        tools = prepared.tools
        if tools is not None:
            message = tools.parse_delta(index, delta.text, delta.token_ids, prepared.prompts[0].token_ids,
                                        finished=finish_reason is not None)
            finish_reason = tools.finish_reason(finish_reason, called=tools.streamed_calls(index))
        result = {
            "index": index,
            "delta": message,
            "logprobs": _logprobs(delta.logprobs or (), body.return_tokens_as_token_ids) if body.logprobs else None,
            "finish_reason": finish_reason,
        }
        if prepared.reports and delta.finish_reason is not None:
            result["guidance"] = guidance_report(delta.guidance, delta.search)
        return result

    def replay_choices(self, body: ChatCompletionRequest, choice: dict) -> list[dict]:
        message = choice["message"]
        delta = {"content": message["content"]}
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        replayed = {"index": choice["index"], "delta": delta,
                    "logprobs": choice["logprobs"], "finish_reason": choice["finish_reason"]}
        replayed.update({key: choice[key] for key in ("token_ids", "guidance") if key in choice})
        return [replayed]


def _logprobs(tokens: Sequence[TokenLogprob], as_ids: bool | None) -> dict:
    """The chat endpoint's logprobs object; tokens named by their ids if `as_ids`, where vLLM's
    server still gives a generated token the bytes of its text (an alternative, those of its name)."""

    def entry(token_id: int, text: str, logprob: float) -> dict:
        token = token_name(token_id, text, as_ids)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(t.token_id, t.token, t.logprob), "bytes": list(t.token.encode("utf-8")),
             "top_logprobs": [entry(*alternative) for alternative in t.top]}
            for t in tokens
        ]
    }
