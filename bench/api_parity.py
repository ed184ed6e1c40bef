"""Side by side: the same requests against vLLM's own OpenAI server and alignserve, on one model.

    .venv/bin/python -m bench.api_parity --model runs/smollm2/base \
        [--guide-models runs/smollm2/guides/guides.json --guide value-r2]

Both servers run with vLLM's hermes tool parser and auto tool choice. Each request is greedy, so
where both answer 200 their outputs can be compared. With `--guide-models`, alignserve also
serves that guide table and the last rows steer with `--guide` (vLLM's server ignores the field;
alignserve's answer shows the steered text and its KL). Writes bench/results/api_parity.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx

from workflows.server_process import alignserve_command, start_server

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "parity-model"
TOOL_FLAGS = ["--tool-call-parser", "hermes", "--enable-auto-tool-choice"]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def chat(**fields: Any) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": "What is 12+19? Answer with the number only."}],
            "max_tokens": 24, "temperature": 0, **fields}


def completion(**fields: Any) -> dict:
    return {"model": NAME, "prompt": "12+19=", "max_tokens": 8, "temperature": 0, **fields}


def response(**fields: Any) -> dict:
    return {"model": NAME, "input": "What is 12+19? Answer with the number only.", "max_output_tokens": 24,
            "temperature": 0, **fields}


WEATHER_TOOL = {"name": "get_weather", "description": WEATHER["function"]["description"],
                "input_schema": WEATHER["function"]["parameters"]}


# (label, method, path, body); a body given as str is sent as is (JSON text with escapes).
REQUESTS: list[tuple[str, str, str, dict | str | None]] = [
    ("chat, plain", "POST", "/v1/chat/completions", chat()),
    ("response_format json_object", "POST", "/v1/chat/completions",
     chat(response_format={"type": "json_object"}, max_tokens=40)),
    ("response_format json_schema", "POST", "/v1/chat/completions",
     chat(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}, max_tokens=40)),
    ("structured_outputs regex", "POST", "/v1/chat/completions", chat(structured_outputs={"regex": "[0-9]{2}"})),
    ("structured_outputs choice", "POST", "/v1/chat/completions", chat(structured_outputs={"choice": ["31", "32"]})),
    ("logit_bias", "POST", "/v1/chat/completions", chat(logit_bias={"33": 5})),
    ("tools, tool_choice required", "POST", "/v1/chat/completions",
     chat(messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60)),
    ("tools, named function", "POST", "/v1/chat/completions",
     chat(messages=ASK, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
          max_tokens=60)),
    ("tools, auto, parallel_tool_calls false", "POST", "/v1/chat/completions",
     chat(messages=ASK, tools=[WEATHER], parallel_tool_calls=False)),
    ("tool result message", "POST", "/v1/chat/completions", chat(messages=[
        *ASK, {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny"}])),
    ("min_tokens", "POST", "/v1/chat/completions", chat(min_tokens=10)),
    ("stop_token_ids", "POST", "/v1/chat/completions", chat(stop_token_ids=[33])),
    ("repetition_penalty", "POST", "/v1/chat/completions", chat(repetition_penalty=1.3)),
    ("min_p", "POST", "/v1/chat/completions", chat(min_p=0.1, temperature=1.0, seed=1)),
    ("metadata, store, service_tier, user", "POST", "/v1/chat/completions",
     chat(metadata={"a": "b"}, store=False, service_tier="auto", user="u")),
    ("add_generation_prompt false, continue_final_message", "POST", "/v1/chat/completions",
     chat(add_generation_prompt=False, continue_final_message=True,
          messages=[{"role": "user", "content": "Count: 1, 2,"}, {"role": "assistant", "content": "3,"}])),
    ("completions, echo + logprobs + max_tokens 0", "POST", "/v1/completions",
     completion(echo=True, logprobs=1, max_tokens=0)),
    ("completions, prompt_logprobs", "POST", "/v1/completions", completion(prompt_logprobs=1)),
    ("completions, bad_words, include_stop_str_in_output", "POST", "/v1/completions",
     completion(bad_words=["3"], stop=["\n"], include_stop_str_in_output=True)),
    ("GET /version", "GET", "/version", None),
    ("POST /tokenize", "POST", "/tokenize", {"model": NAME, "prompt": "12+19="}),
    ("POST /detokenize", "POST", "/detokenize", {"model": NAME, "tokens": [33, 34]}),
    ("prompt with a lone surrogate", "POST", "/v1/completions",
     json.dumps(completion(prompt="x\ud800"))),
    ("prompt with NUL", "POST", "/v1/completions", completion(prompt="1\u00002=")),
    ("mistyped field (guidanse)", "POST", "/v1/completions", completion(guidanse=[])),
    ("messages, plain", "POST", "/v1/messages", chat()),
    ("messages, system + stop_sequences", "POST", "/v1/messages",
     chat(system="Answer with digits.", stop_sequences=["1"])),
    ("messages, tools, tool_choice any", "POST", "/v1/messages",
     chat(messages=ASK, tools=[WEATHER_TOOL], tool_choice={"type": "any"}, max_tokens=60)),
    ("messages, tool_use + tool_result", "POST", "/v1/messages", chat(tools=[WEATHER_TOOL], messages=[
        *ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "get_weather",
                                                 "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "Sunny"}]}])),
    ("POST /v1/messages/count_tokens", "POST", "/v1/messages/count_tokens",
     {"model": NAME, "system": "Answer with digits.", "messages": ASK}),
    ("responses, plain", "POST", "/v1/responses", response()),
    ("responses, instructions + messages", "POST", "/v1/responses", response(
        instructions="Answer with digits.", input=[{"role": "user", "content": [{"type": "input_text", "text": "12+"}]},
                                                   {"role": "user", "content": "19="}])),
    ("responses, text.format json_schema", "POST", "/v1/responses", response(
        text={"format": {"type": "json_schema", "name": "p", "schema": PERSON}}, max_output_tokens=40)),
    ("responses, output logprobs", "POST", "/v1/responses",
     response(include=["message.output_text.logprobs"], top_logprobs=2, max_output_tokens=4)),
    ("responses, max_output_tokens 2 (incomplete)", "POST", "/v1/responses", response(max_output_tokens=2)),
    ("responses, function tools", "POST", "/v1/responses", response(
        input="What is the weather in Paris?", tools=[{"type": "function", **WEATHER["function"]}],
        max_output_tokens=60)),
    ("responses, unknown previous_response_id", "POST", "/v1/responses", response(previous_response_id="resp_none")),
    ("GET /v1/responses/{unknown id}", "GET", "/v1/responses/resp_none", None),
    ("POST /v1/responses/{unknown id}/cancel", "POST", "/v1/responses/resp_none/cancel", None),
]


def guided_requests(guide: str) -> list[tuple[str, str, str, dict | str | None]]:
    """alignserve's own field, alone and composed with a JSON schema (`guide`: a value model's name)."""
    guidance = [{"type": "qsharp", "model": guide, "strength": 4}]
    return [
        ("guidance (alignserve's own)", "POST", "/v1/completions", completion(guidance=guidance)),
        ("guidance + response_format json_schema", "POST", "/v1/chat/completions",
         chat(guidance=guidance, max_tokens=40,
              response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})),
        ("guidance on /v1/responses", "POST", "/v1/responses", response(guidance=guidance)),
    ]


def output_of(body: Any) -> Any:
    """What a response produced, for comparing the two servers (ids and timestamps left out)."""
    if not isinstance(body, dict):
        return body
    if body.get("type") == "message":
        blocks = [(b["type"], b.get("text"), b.get("name"), b.get("input")) for b in body["content"]]
        return [blocks, body["stop_reason"], body.get("stop_sequence")]
    if body.get("object") == "response":
        items = [(item["type"], [(c["type"], c.get("text")) for c in item.get("content") or ()])
                 for item in body["output"]]
        return [items, body["status"]]
    if "choices" in body:
        out = []
        for choice in body["choices"]:
            message = choice.get("message") or {}
            calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or ()]
            out.append((choice.get("text"), message.get("content"), calls, choice.get("finish_reason")))
        return out
    return {k: v for k, v in body.items() if k not in ("version", "vllm_version")}


def summary(status: int, body: Any) -> str:
    if status != 200:
        error = body.get("error", body) if isinstance(body, dict) else body
        message = error.get("message", "") if isinstance(error, dict) else str(error)
        return f"{status}: {str(message)[:70]}"
    if isinstance(body, dict) and body.get("type") == "message":
        calls = [b["name"] for b in body["content"] if b["type"] == "tool_use"]
        shown = f"tool_use {calls}" if calls else repr("".join(b.get("text", "") for b in body["content"]))
        return f"200: {shown[:60]} ({body['stop_reason']})"
    if isinstance(body, dict) and body.get("object") == "response":
        shown = [item["type"] if item["type"] != "message" else
                 repr("".join(c.get("text", "") for c in item["content"])) for item in body["output"]]
        kl = f" (KL {body['guidance']['kl']:.3f})" if "kl" in body.get("guidance", {}) else ""
        return f"200: {', '.join(shown)[:60]} ({body['status']}){kl}"
    if isinstance(body, dict) and "choices" in body:
        choice = body["choices"][0]
        message = choice.get("message") or {}
        calls = message.get("tool_calls") or ()
        shown = f"calls {[c['function']['name'] for c in calls]}" if calls else repr(
            choice.get("text") if "text" in choice else message.get("content"))
        guidance = choice.get("guidance") or (body.get("guidance") if isinstance(body.get("guidance"), dict) else None)
        kl = f" (KL {guidance['kl']:.3f})" if guidance and "kl" in guidance else ""
        return f"200: {shown[:60]}{kl}"
    return f"200: {json.dumps(body)[:60]}"


def send(client: httpx.Client, method: str, path: str, body: dict | str | None) -> tuple[int, Any]:
    if method == "GET":
        response = client.get(path)
    elif isinstance(body, str):
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post(path, json=body)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


def run(kind: str, model: Path, log_dir: Path, requests: list, guide_models: Path | None) -> list[tuple[int, Any]]:
    if kind == "alignserve":
        guide_flags = ["--guide-models", str(guide_models)] if guide_models else []

        def command(port: int) -> list[str]:
            return alignserve_command(model, port, ["--served-model-name", NAME, "--max-model-len", "1024",
                                                    "--enforce-eager", *TOOL_FLAGS, *guide_flags])
    else:
        def command(port: int) -> list[str]:
            return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                    "--port", str(port), "--served-model-name", NAME, "--max-model-len", "1024",
                    "--generation-config", "vllm", "--enforce-eager", *TOOL_FLAGS]
    with start_server(kind, command, log_dir / f"{kind}.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            return [send(client, method, path, body) for _, method, path, body in requests]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="Model directory both servers serve.")
    parser.add_argument("--out", type=Path, default=RESULTS / "api_parity", help="Output path stem (.json, .md).")
    parser.add_argument("--guide-models", type=Path, help="Guide table alignserve serves (enables the guided rows).")
    parser.add_argument("--guide", default="value-r2", help="Value model of that table the guided rows steer with.")
    args = parser.parse_args()
    log_dir = args.out.parent / "logs"
    requests = REQUESTS + (guided_requests(args.guide) if args.guide_models else [])
    vllm_results = run("vllm", args.model, log_dir, requests, None)
    ours = run("alignserve", args.model, log_dir, requests, args.guide_models)
    rows = []
    for (label, method, path, _), (v_status, v_body), (a_status, a_body) in zip(requests, vllm_results, ours):
        same = "yes" if v_status == a_status == 200 and output_of(v_body) == output_of(a_body) else (
            "no" if v_status == a_status == 200 else "")
        rows.append({"request": label, "endpoint": f"{method} {path}", "vllm": summary(v_status, v_body),
                     "alignserve": summary(a_status, a_body), "same_output": same,
                     "vllm_output": output_of(v_body), "alignserve_output": output_of(a_body)})
    args.out.with_suffix(".json").write_text(json.dumps({"model": str(args.model), "rows": rows}, indent=2))
    guided = (f" alignserve also serves `{args.guide_models}`; the guidance rows steer with `{args.guide}`, which "
              "vLLM's server ignores, so their outputs differ by design." if args.guide_models else "")
    lines = [f"Model: `{args.model}`, greedy requests, both servers with `{' '.join(TOOL_FLAGS)}`.{guided}", "",
             "| request | endpoint | vLLM's server | alignserve | same output |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [row["request"], row["endpoint"], row["vllm"], row["alignserve"], row["same_output"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
