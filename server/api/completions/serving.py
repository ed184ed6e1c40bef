"""Logic of POST /v1/completions: prompts to engine requests to OpenAI text completions."""

from __future__ import annotations

from server.api.choices import guidance_report
from server.api.common import check_n, completion_budget
from server.api.completions.protocol import CompletionRequest
from server.api.generation import GenerationServing, Prepared, PreparedPrompt
from server.engine import ChoiceDelta, ChoiceOutput, TokenLogprob


class CompletionServing(GenerationServing):
    id_prefix = "cmpl"
    object = "text_completion"
    chunk_object = "text_completion"

    def prepare(self, body: CompletionRequest) -> Prepared:
        services = self.services
        services.check_model(body.model)
        check_n(body.n, services.settings.max_n)
        guidance = services.resolve_guidance(body.guidance)
        search = services.resolve_search(body.search)
        services.check_max_tokens(body.max_tokens, "max_tokens")
        prompts = body.prompts()
        prepared = []
        for i, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(prompt, str):
                token_ids, text = services.renderer.encode(prompt), prompt
            else:
                token_ids = services.renderer.check_token_ids(prompt, param)
                text = services.renderer.decode(prompt)
            max_tokens = completion_budget(
                len(token_ids), body.max_tokens, services.engine.max_model_len,
                prompt_param=param, max_tokens_param="max_tokens", limit=services.settings.max_tokens_limit,
            )
            services.check_search_fits(search, len(token_ids), max_tokens, "max_tokens")
            prepared.append(PreparedPrompt(token_ids, text, body.sampling_options(max_tokens, body.logprobs, guidance)))
        return Prepared(prepared, guidance, search)

    def _echo(self, body: CompletionRequest, prepared: Prepared, index: int) -> str:
        return prepared.prompts[index // body.n].text if body.echo else ""

    def choice(self, body: CompletionRequest, prepared: Prepared, index: int, choice: ChoiceOutput) -> dict:
        prefix = self._echo(body, prepared, index)
        result = {
            "index": index,
            "text": prefix + choice.text,
            "logprobs": _logprobs(choice.logprobs, choice.text, len(prefix)) if body.logprobs is not None else None,
            "finish_reason": choice.finish_reason,
        }
        if prepared.reports:
            result["guidance"] = guidance_report(choice.guidance, choice.search)
        return result

    def chunk_choice(self, body: CompletionRequest, prepared: Prepared, index: int, delta: ChoiceDelta,
                     previous_text: str | None) -> dict:
        prefix = self._echo(body, prepared, index)
        start = len(prefix) + len(previous_text or "")  # character offset of this delta's first token
        result = {
            "index": index,
            "text": (prefix if previous_text is None else "") + delta.text,
            "logprobs": _logprobs(list(delta.logprobs or ()), delta.text, start) if body.logprobs is not None else None,
            "finish_reason": delta.finish_reason,
        }
        if prepared.reports and delta.finish_reason is not None:
            result["guidance"] = guidance_report(delta.guidance, delta.search)
        return result

    def replay_choices(self, body: CompletionRequest, choice: dict) -> list[dict]:
        return [choice]


def _logprobs(tokens: list[TokenLogprob], text: str, text_offset: int) -> dict:
    """The completions endpoint's logprobs object for `tokens`, which produced `text`.

    Offsets count characters of the returned text from `text_offset`; a token whose string is
    not in the text (a special token the text skips) takes no room.
    """
    offsets, position = [], 0
    for token in tokens:
        offsets.append(text_offset + position)
        if text.startswith(token.token, position):
            position += len(token.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": offsets,
    }
