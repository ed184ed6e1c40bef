"""Logic of POST /v1/completions: prompts to engine requests to OpenAI text completions."""

from __future__ import annotations

from server.api.choices import guidance_report, token_name
from server.api.common import check_n, completion_budget, truncate_prompt
from server.api.completions.protocol import CompletionRequest
from server.api.generation import GenerationServing, Prepared, PreparedPrompt
from server.engine import ChoiceDelta, ChoiceOutput, PromptLogprobs, TokenLogprob
from server.prompts import PromptRenderer


class CompletionServing(GenerationServing):
    id_prefix = "cmpl"
    object = "text_completion"
    chunk_object = "text_completion"

    def prepare(self, body: CompletionRequest) -> Prepared:
        services = self.services
        services.check_model(body.model)
        check_n(body.n, services.settings.max_n)
        guidance = services.resolve_guidance(body.guidance, body.kl_budget)
        search = services.resolve_search(body.search)
        services.check_max_tokens(body.max_tokens, "max_tokens")
        prompts = body.prompts()
        vllm_request = body.as_vllm_request()  # once: the fields are the same for every prompt
        prepared = []
        for i, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(prompt, str):
                token_ids = services.renderer.encode(prompt, add_special_tokens=body.add_special_tokens)
            else:
                token_ids = services.renderer.check_token_ids(prompt, param)
            if body.truncate_prompt_tokens is not None:
                token_ids = truncate_prompt(token_ids, body.truncate_prompt_tokens, services.engine.max_model_len)
            text = prompt if isinstance(prompt, str) and body.truncate_prompt_tokens is None else \
                services.renderer.decode(token_ids)
            max_tokens = completion_budget(
                len(token_ids), body.max_tokens, services.engine.max_model_len,
                prompt_param=param, max_tokens_param="max_tokens", limit=services.settings.max_tokens_limit,
            )
            services.check_search_fits(search, len(token_ids), max_tokens, "max_tokens")
            # Scoring the prompt alone still runs one engine step, whose token is not returned.
            options = body.sampling_options(max(max_tokens, 1), body.logprobs, guidance, vllm_request)
            prepared.append(PreparedPrompt(token_ids, text, options))
        return Prepared(prepared, guidance, search, budget=body.kl_budget, prompt_only=body.scores_prompt_only)

    def _prompt(self, body: CompletionRequest, prepared: Prepared, index: int) -> PreparedPrompt:
        return prepared.prompts[index // body.n]

    def choice(self, body: CompletionRequest, prepared: Prepared, index: int, choice: ChoiceOutput) -> dict:
        prompt = self._prompt(body, prepared, index)
        prefix = prompt.text if body.echo else ""  # logprob offsets count it even when the text leaves it out
        logprobs = None
        if body.logprobs is not None:
            logprobs = _logprobs(choice.logprobs, choice.text, len(prefix), body.return_tokens_as_token_ids)
            if body.echo:
                echoed = _echoed_logprobs(prompt, choice.prompt_logprobs, self.services.renderer,
                                          body.return_tokens_as_token_ids)
                logprobs = _join(echoed, logprobs)
        result = {
            "index": index,
            "text": (prefix if body.echoes_text else "") + choice.text,
            "logprobs": logprobs,
            "finish_reason": choice.finish_reason,
        }
        if body.return_token_ids:
            result["prompt_token_ids"] = prompt.token_ids
        if body.prompt_logprobs is not None:
            result["prompt_logprobs"] = choice.prompt_logprobs
        if prepared.reports:
            result["guidance"] = guidance_report(choice.guidance, choice.search)
        return result

    def chunk_choice(self, body: CompletionRequest, prepared: Prepared, index: int, delta: ChoiceDelta,
                     previous_text: str | None) -> dict:
        prompt = self._prompt(body, prepared, index)
        first = previous_text is None  # the prompt (echoed, or its token ids) goes out with the first delta
        prefix = prompt.text if body.echo else ""
        start = len(prefix) + len(previous_text or "")  # character offset of this delta's first token
        logprobs = None
        if body.logprobs is not None:
            logprobs = _logprobs(list(delta.logprobs or ()), delta.text, start, body.return_tokens_as_token_ids)
            if body.echo and first:
                echoed = _echoed_logprobs(prompt, delta.prompt_logprobs, self.services.renderer,
                                          body.return_tokens_as_token_ids)
                logprobs = _join(echoed, logprobs)
        result = {
            "index": index,
            "text": (prefix if first and body.echoes_text else "") + delta.text,
            "logprobs": logprobs,
            "finish_reason": delta.finish_reason,
        }
        if body.return_token_ids and first:
            result["prompt_token_ids"] = prompt.token_ids
        if body.prompt_logprobs is not None and delta.prompt_logprobs is not None:
            result["prompt_logprobs"] = delta.prompt_logprobs
        if prepared.reports and delta.finish_reason is not None:
            result["guidance"] = guidance_report(delta.guidance, delta.search)
        return result

    def replay_choices(self, body: CompletionRequest, choice: dict) -> list[dict]:
        return [choice]


def _echoed_logprobs(prompt: PreparedPrompt, positions: PromptLogprobs | None, renderer: PromptRenderer,
                     as_ids: bool | None) -> dict:
    """The prompt's part of an echoed logprobs object, as vLLM's server writes it: each prompt
    token with its logprob given the tokens before it (None for the first, which has no context)
    and every alternative vLLM returned for that position; tokens named by their ids if `as_ids`."""
    positions = positions or (None,) * len(prompt.token_ids)
    tokens, token_logprobs, top_logprobs, offsets, offset = [], [], [], [], 0
    for token_id, position in zip(prompt.token_ids, positions):
        if position is None:
            text, logprob, top = renderer.decode([token_id]), None, None
        else:
            own = position[str(token_id)]
            text, logprob = own["decoded_token"], own["logprob"]
            top = {token_name(int(top_id), entry["decoded_token"], as_ids): entry["logprob"]
                   for top_id, entry in position.items()}
        tokens.append(token_name(token_id, text, as_ids))
        token_logprobs.append(logprob)
        top_logprobs.append(top)
        offsets.append(offset)
        if prompt.text.startswith(text, offset):
            offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _join(first: dict, second: dict) -> dict:
    return {key: first[key] + second[key] for key in first}


def _logprobs(tokens: list[TokenLogprob], text: str, text_offset: int, as_ids: bool | None) -> dict:
    """The completions endpoint's logprobs object for `tokens`, which produced `text`; tokens
    named by their ids if `as_ids`.

    Offsets count characters of the generated text from `text_offset`; a token whose string is
    not in the text (a special token the text skips) takes no room.
    """
    offsets, position = [], 0
    for token in tokens:
        offsets.append(text_offset + position)
        if text.startswith(token.token, position):
            position += len(token.token)
    return {
        "tokens": [token_name(t.token_id, t.token, as_ids) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{token_name(top_id, top_text, as_ids): logprob for top_id, top_text, logprob in t.top}
                         for t in tokens],
        "text_offset": offsets,
    }
