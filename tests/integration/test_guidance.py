"""Token-level guidance through the real server and engine, on guide models of every head type."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from openai import AsyncOpenAI
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from models.runtime import build_head, save_head

from models.demo.build import demo_base_dir
from models.demo.task import sample_problems
from tests.conftest import start_server, stop_server
from tests.reference_guidance import ReferenceGuide, guided_greedy, guided_kl, steered_steps

pytestmark = pytest.mark.engine

HEADS = {
    "demo-value": {"type": "bernoulli", "scoring": "q"},
    "demo-value-hist": {"type": "histogram", "scoring": "v", "atoms": [0.0, 0.5, 1.0]},
    "demo-prefix": {"type": "expected", "scoring": "v"},
    "demo-arm": {"type": "arm", "scoring": "q", "rank": 8},
    "demo-genarm": {"type": "lm", "scoring": "q"},
}


def build_guides(root: Path) -> Path:
    """Guide models of every head type on backbones shaped like the demo base, with seeded random
    weights: enough to check the plumbing against the reference loop exactly."""
    config = AutoConfig.from_pretrained(demo_base_dir())
    table = {}
    for i, (name, head_config) in enumerate(HEADS.items()):
        path = root / name
        torch.manual_seed(i)
        LlamaForCausalLM(config).save_pretrained(path)
        for file in demo_base_dir().iterdir():
            if file.name.startswith("tokenizer") or file.name == "chat_template.jinja":
                shutil.copy(file, path / file.name)
        head = build_head(head_config, config.hidden_size, config.vocab_size)
        with torch.no_grad():
            for parameter in head.parameters():
                parameter.normal_(0, 0.5)
        save_head(head, path)
        table[name] = name
    (root / "guides.json").write_text(json.dumps(table))
    return root / "guides.json"


@pytest.fixture(scope="module")
def guides_file(tmp_path_factory) -> Path:
    return build_guides(tmp_path_factory.mktemp("guides"))


@pytest.fixture(scope="module")
def guided(tmp_path_factory, guides_file):
    # float32 like the reference loop (vLLM on CPU runs "auto" float32 checkpoints in bfloat16),
    # so the reported KL, which depends on the whole base distribution, is compared exactly.
    running = start_server(tmp_path_factory.mktemp("guided") / "server.log", "--guide-models", str(guides_file),
                           "--dtype", "float32")
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def openai_client(guided):
    from openai import OpenAI

    return OpenAI(base_url=f"{guided.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(guided):
    with httpx.Client(base_url=guided.base_url, timeout=120) as client:
        yield client

PROMPT = "234+567="
GATE = 0.5  # nats: the demo base is sure of some digits of these prompts and unsure of others
GUIDANCES = {
    "qsharp": [{"type": "qsharp", "model": "demo-value", "strength": 4.0}],
    "qsharp-hist": [{"type": "qsharp", "model": "demo-value-hist", "strength": 4.0, "top_k": 8}],
    "cd": [{"type": "cd", "model": "demo-prefix", "strength": 3.0, "top_k": 8}],
    "arm": [{"type": "arm", "model": "demo-arm", "strength": 2.0}],
    "genarm": [{"type": "genarm", "model": "demo-genarm", "strength": 1.0}],
    "composed": [{"type": "qsharp", "model": "demo-value", "strength": 2.0, "top_k": 10},
                 {"type": "genarm", "model": "demo-genarm", "strength": 0.5}],
    "gated": [{"type": "qsharp", "model": "demo-value-hist", "strength": 4.0, "top_k": 8, "min_entropy": GATE},
              {"type": "arm", "model": "demo-arm", "strength": 2.0, "min_entropy": 2 * GATE}],
}


def complete(client, model, guidance=None, **kwargs):
    extra = dict(kwargs.pop("extra_body", {}))
    if guidance is not None:
        extra["guidance"] = guidance
    return client.completions.create(model=model, extra_body=extra, **kwargs)


@pytest.mark.parametrize("name", sorted(GUIDANCES))
def test_strength_zero_is_token_for_token_unguided(openai_client, model_name, name):
    zero = [{**entry, "strength": 0.0} for entry in GUIDANCES[name]]
    for kwargs in ({"temperature": 0}, {"temperature": 1.0, "seed": 5, "n": 3}):
        plain = complete(openai_client, model_name, prompt=PROMPT, max_tokens=10, **kwargs)
        zeroed = complete(openai_client, model_name, zero, prompt=PROMPT, max_tokens=10, **kwargs)
        assert [c.text for c in zeroed.choices] == [c.text for c in plain.choices]
        assert all(c.model_extra["guidance"] == {"kl": 0.0, "steps": 0} for c in zeroed.choices)


@pytest.fixture(scope="module")
def reference(guides_file):
    base = LlamaForCausalLM.from_pretrained(demo_base_dir(), torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_base_dir())
    table = json.loads(guides_file.read_text())
    guides = {name: ReferenceGuide(guides_file.parent / path) for name, path in table.items()}
    return base, tokenizer, guides


@pytest.mark.parametrize("name", sorted(GUIDANCES))
def test_guided_greedy_equals_reference_loop(openai_client, model_name, reference, name):
    base, tokenizer, guides = reference
    for prompt in ("234+567=", "81-95=", "9+990="):
        ids = tokenizer.encode(prompt)
        expected = guided_greedy(base, guides, GUIDANCES[name], ids, max_tokens=8, eos_id=tokenizer.eos_token_id)
        result = complete(openai_client, model_name, GUIDANCES[name], prompt=prompt, max_tokens=8, temperature=0)
        assert result.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True), prompt


def test_guidance_reports_kl_and_steps(openai_client, model_name):
    result = complete(openai_client, model_name, GUIDANCES["composed"], prompt=PROMPT, max_tokens=6,
                      temperature=1.0, seed=3, n=2, extra_body={"ignore_eos": True})
    for choice in result.choices:
        report = choice.model_extra["guidance"]
        assert report["steps"] == 6 and report["kl"] > 0
    assert result.model_extra["guidance"] == {"entries": [
        {"type": "qsharp", "model": "demo-value", "strength": 2.0, "top_k": 10, "min_entropy": 0.0},
        {"type": "genarm", "model": "demo-genarm", "strength": 0.5, "top_k": -1, "min_entropy": 0.0}]}


def test_entropy_gate_steers_only_uncertain_positions(openai_client, model_name, reference):
    """`steps` counts the positions where some entry's gate was open (as the reference loop counts
    them), and `min_entropy: 0` is ungated guidance token for token. The KL of gated guidance is
    checked against the reference in test_reported_kl_is_the_reference_kl_at_the_sampling_temperature."""
    base, tokenizer, _ = reference
    steered, tokens = 0, 0
    for prompt in [p.prompt for p in sample_problems(6, seed=5)]:
        choice = complete(openai_client, model_name, GUIDANCES["gated"], prompt=prompt, max_tokens=8,
                          temperature=1.0, seed=9).choices[0]
        output_ids = tokenizer.encode(choice.text, add_special_tokens=False)
        if choice.finish_reason == "stop":
            output_ids.append(tokenizer.eos_token_id)  # sampled, guided, and not in the text
        expected = steered_steps(base, GUIDANCES["gated"], tokenizer.encode(prompt), output_ids, 1.0)
        assert choice.model_extra["guidance"]["steps"] == expected, prompt
        steered, tokens = steered + expected, tokens + len(output_ids)
    assert 0 < steered < tokens  # the gate both opened and closed on these prompts
    ungated = [{k: v for k, v in e.items() if k != "min_entropy"} for e in GUIDANCES["gated"]]
    at_zero = [{**e, "min_entropy": 0} for e in GUIDANCES["gated"]]
    for kwargs in ({"temperature": 0}, {"temperature": 1.0, "seed": 5, "n": 3}):
        plain = complete(openai_client, model_name, ungated, prompt=PROMPT, max_tokens=10, **kwargs)
        zero = complete(openai_client, model_name, at_zero, prompt=PROMPT, max_tokens=10, **kwargs)
        assert [(c.text, c.model_extra["guidance"]["steps"]) for c in zero.choices] == \
            [(c.text, c.model_extra["guidance"]["steps"]) for c in plain.choices]
        # The KL of rows batched in another order differs in float rounding only.
        assert [c.model_extra["guidance"]["kl"] for c in zero.choices] == \
            pytest.approx([c.model_extra["guidance"]["kl"] for c in plain.choices], rel=1e-5)


@pytest.mark.parametrize(
    ("name", "temperature", "top_p"),
    [("composed", 0.6, 1.0), ("composed", 1.7, 0.9), ("qsharp-hist", 0.5, 1.0), ("composed", 0.0, 1.0),
     ("gated", 0.7, 1.0)],
)
def test_reported_kl_is_the_reference_kl_at_the_sampling_temperature(openai_client, model_name, reference,
                                                                      name, temperature, top_p):
    """`guidance.kl` is the sum over the response of KL(softmax((l + d) / T) || softmax(l / T)),
    before top-p truncation; greedy (T = 0) is reported at T = 1. Checked by teacher-forcing each
    returned completion through the plain-torch reference."""
    base, tokenizer, guides = reference
    prompt_ids = tokenizer.encode(PROMPT)
    result = complete(openai_client, model_name, GUIDANCES[name], prompt=PROMPT, max_tokens=6,
                      temperature=temperature, top_p=top_p, seed=21, n=2)
    for choice in result.choices:
        report = choice.model_extra["guidance"]
        output_ids = tokenizer.encode(choice.text, add_special_tokens=False)
        if choice.finish_reason == "stop":
            output_ids.append(tokenizer.eos_token_id)  # sampled, guided, and not in the text
        assert report["steps"] == steered_steps(base, GUIDANCES[name], prompt_ids, output_ids, temperature), \
            (choice.text, choice.finish_reason)
        at_t, at_one = guided_kl(base, guides, GUIDANCES[name], prompt_ids, output_ids, temperature)
        assert report["kl"] == pytest.approx(at_t, rel=2e-3, abs=1e-5), (choice.text, at_one)
        if temperature > 0:
            assert abs(at_t - at_one) > 1e-2 * max(at_t, at_one)  # the temperature changes the answer


def test_streamed_guided_equals_non_streamed_and_reports_in_final_chunk(openai_client, model_name):
    kwargs = dict(prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11, n=2)
    whole = complete(openai_client, model_name, GUIDANCES["qsharp"], **kwargs)
    texts, reports = {}, {}
    for chunk in complete(openai_client, model_name, GUIDANCES["qsharp"], stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                reports[choice.index] = choice.model_extra["guidance"]
            else:
                assert "guidance" not in (choice.model_extra or {})
    for choice in whole.choices:
        assert texts[choice.index] == choice.text
        assert reports[choice.index]["steps"] == choice.model_extra["guidance"]["steps"]
        assert reports[choice.index]["kl"] == pytest.approx(choice.model_extra["guidance"]["kl"], rel=1e-4)


def test_chat_guidance(openai_client, model_name):
    result = openai_client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=8,
        extra_body={"guidance": GUIDANCES["cd"]})
    assert result.choices[0].model_extra["guidance"]["steps"] >= 1


def test_mixed_batch_gives_each_request_its_solo_output(guided, openai_client, model_name):
    """Guided and unguided requests joining and leaving at different times (rows removed, added, moved)."""
    plan = [(0.00, None, 12), (0.05, "qsharp", 4), (0.10, "cd", 16), (0.12, None, 3),
            (0.20, "arm", 9), (0.25, "genarm", 6), (0.30, "qsharp-hist", 11), (0.35, "composed", 7)]
    prompts = [p.prompt for p in sample_problems(len(plan), seed=99)]
    solo = [complete(openai_client, model_name, GUIDANCES.get(g), prompt=p, max_tokens=n, temperature=0,
                     extra_body={"ignore_eos": True}).choices[0].text for p, (_, g, n) in zip(prompts, plan)]

    async def run():
        async with AsyncOpenAI(base_url=f"{guided.base_url}/v1", api_key="unused", max_retries=0) as client:
            async def one(prompt, delay, name, n):
                await asyncio.sleep(delay)
                extra = {"ignore_eos": True}
                if name:
                    extra["guidance"] = GUIDANCES[name]
                result = await client.completions.create(model=model_name, prompt=prompt, max_tokens=n,
                                                         temperature=0, extra_body=extra)
                return result.choices[0].text
            return await asyncio.gather(*(one(p, d, g, n) for p, (d, g, n) in zip(prompts, plan)))

    for _ in range(2):
        assert asyncio.run(run()) == solo


@pytest.mark.parametrize(
    ("guidance", "param"),
    [
        ([{"type": "nope", "model": "demo-value", "strength": 1}], "guidance[0].type"),
        ([{"type": "qsharp", "model": "no-such-model", "strength": 1}], "guidance[0].model"),
        ([{"type": "qsharp", "model": "demo-value", "strength": -1}], "guidance[0].strength"),
        ([{"type": "qsharp", "model": "demo-value", "strength": 1, "eta": 1}], "guidance[0].eta"),
        ([{"type": "arm", "model": "demo-arm", "strength": 1}, {"type": "arm", "model": "demo-value", "strength": 1}],
         "guidance[1].model"),
        ([{"type": "cd", "model": "demo-prefix", "strength": 1, "top_k": -1}], "guidance[0].top_k"),
        ([{"type": "cd", "model": "demo-prefix", "strength": 1, "min_entropy": -1}], "guidance[0].min_entropy"),
        ([{"type": "qsharp", "model": "demo-value", "strength": 1}] * 5, "guidance"),
        ("qsharp", "guidance"),
        ([3], "guidance[0]"),
    ],
)
def test_bad_guidance_is_400_naming_the_field(http, model_name, guidance, param):
    for path, body in (("/v1/completions", {"prompt": PROMPT}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]})):
        response = http.post(path, json={"model": model_name, "guidance": guidance, **body})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


def test_guidance_listing(http):
    listing = http.get("/v1/guidance").json()
    assert {m["type"] for m in listing["modules"]} >= {"qsharp", "cd", "arm", "genarm"}
    models = {m["name"]: m for m in listing["guide_models"]}
    assert set(models) == {"demo-value", "demo-value-hist", "demo-prefix", "demo-arm", "demo-genarm"}
    assert models["demo-value"]["head"] == "bernoulli"
    qsharp = next(m for m in listing["modules"] if m["type"] == "qsharp")
    assert qsharp["parameters"]["strength"]["minimum"] == 0.0
