"""GET /version, POST /tokenize and POST /detokenize, in the request and response shapes of vLLM's server.

Clients written for `vllm serve` call them: `vllm bench serve` probes /tokenize, evaluation
harnesses count tokens with it. A chat request is rendered exactly as /v1/chat/completions
renders it, so its count is the prompt's usage.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Annotated, Any

import vllm
from fastapi import APIRouter, Depends
from pydantic import Field, create_model
from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest as VllmTokenizeChat
from vllm.entrypoints.serve.tokenize.protocol import TokenizeCompletionRequest as VllmTokenizeCompletion

from server.api.chat.protocol import ChatMessage
from server.api.common import StrictModel
from server.api.vllm_fields import vllm_fields
from server.prompts import ChatTemplateOptions
from server.services import Services, get_services

router = APIRouter()

# Fields declared as vLLM declares them.
_TokenizeText = create_model("TokenizeTextFields", __base__=StrictModel, **vllm_fields(
    VllmTokenizeCompletion, ("model", "prompt", "add_special_tokens", "return_token_strs")))
_TokenizeChat = create_model("TokenizeChatFields", __base__=StrictModel, **vllm_fields(
    VllmTokenizeChat, ("model", "add_generation_prompt", "continue_final_message", "chat_template_kwargs",
                       "tools", "return_token_strs")))


class TokenizeText(_TokenizeText):
    pass


class TokenizeChat(_TokenizeChat):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


class Detokenize(StrictModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


@router.get("/version")
async def show_version() -> dict[str, str]:
    """vLLM's shape ({"version"}) with our version, and the vLLM version beside it."""
    return {"version": version("alignserve"), "vllm_version": vllm.__version__}


@router.post("/tokenize")
async def tokenize(body: TokenizeText | TokenizeChat, services: Services = Depends(get_services)) -> dict[str, Any]:
    if body.model is not None:
        services.check_model(body.model)
    renderer = services.renderer
    if isinstance(body, TokenizeChat):
        template = ChatTemplateOptions(
            tools=[tool.model_dump(exclude_none=True) for tool in body.tools or ()] or None,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            template_kwargs=body.chat_template_kwargs or {},
        )
        tokens = renderer.render_chat([m.template_message() for m in body.messages], template)
    else:
        tokens = renderer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"count": len(tokens), "max_model_len": services.engine.max_model_len, "tokens": tokens,
            "token_strs": renderer.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None}


@router.post("/detokenize")
async def detokenize(body: Detokenize, services: Services = Depends(get_services)) -> dict[str, str]:
    if body.model is not None:
        services.check_model(body.model)
    return {"prompt": services.renderer.decode(services.renderer.check_token_ids(body.tokens, "tokens"))}

