"""The clients users point at an OpenAI-compatible server, run against ours: LangChain, LiteLLM, the
lm-eval harness and vLLM's own load generator. A client that fails, or that finishes with wrong
numbers, fails its test. Each result is checked against what the server itself answers."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import BaseModel

from models.demo.build import demo_base_dir

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
LM_EVAL = Path(sys.executable).parent / "lm_eval"


def sum_problems(count: int) -> list[dict]:
    rng = random.Random(0)
    problems = []
    for _ in range(count):
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        total = a + b
        problems.append({"question": f"{a}+{b}=", "choices": [str(total), str(total + 10), str(total - 10)],
                         "gold": 0, "answer": str(total)})
    return problems


def write_tasks(folder: Path, problems: list[dict]) -> None:
    """Two lm-eval tasks over one local JSON Lines file: multiple choice and generate-until."""
    data = folder / "sums.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n" \
             "doc_to_text: \"{{question}}\"\n"
    (folder / "sums_mc.yaml").write_text(
        f"task: sums_mc\n{common}output_type: multiple_choice\ndoc_to_choice: \"{{{{choices}}}}\"\n"
        "doc_to_target: \"{{gold}}\"\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n")
    (folder / "sums_gen.yaml").write_text(
        f"task: sums_gen\n{common}output_type: generate_until\ndoc_to_target: \"{{{{answer}}}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n")


def lm_eval(tmp_path: Path, model: str, model_args: str, task: str, *extra: str) -> tuple[dict, list[dict]]:
    """Run the lm-eval CLI; its aggregate results and its logged samples."""
    out = tmp_path / "lm-eval-out"
    run = subprocess.run(
        [str(LM_EVAL), "--model", model, "--model_args", model_args, "--tasks", task, "--include_path", str(tmp_path),
         "--output_path", str(out), "--log_samples", *extra],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")})
    assert run.returncode == 0, run.stderr[-4000:]
    (results,) = out.glob("*/results_*.json")
    (samples,) = out.glob(f"*/samples_{task}_*.jsonl")
    return json.loads(results.read_text())["results"][task], [json.loads(line) for line in samples.open()]


def test_lm_eval_loglikelihood_matches_the_servers_own_logprobs(server, http, tmp_path):
    """`local-completions` scores choices with echo + logprobs (max_tokens 1): each logged
    loglikelihood must equal the sum of logprobs the server reports when it generates that answer."""
    write_tasks(tmp_path, sum_problems(8))
    args = (f"model=demo-base,base_url={server.base_url}/v1/completions,tokenizer={demo_base_dir()},"
            "tokenizer_backend=huggingface,num_concurrent=2,max_retries=1,add_bos_token=True")
    results, samples = lm_eval(tmp_path, "local-completions", args, "sums_mc")
    checked = 0
    for sample in samples:
        question = sample["doc"]["question"]
        generated = http.post("/v1/completions", json={"model": "demo-base", "prompt": question, "max_tokens": 2,
                                                       "temperature": 0, "logprobs": 0}).json()["choices"][0]
        for choice, response in zip(sample["doc"]["choices"], sample["resps"]):
            if choice == generated["text"]:
                assert float(response[0][0]) == pytest.approx(sum(generated["logprobs"]["token_logprobs"]), abs=1e-3)
                checked += 1
    assert checked >= len(samples) // 2  # the demo model answers most of these sums
    assert results["acc,none"] == pytest.approx(sum(s["acc"] for s in samples) / len(samples))


def test_lm_eval_chat_generate_until_scores_the_servers_answers(server, openai_client, tmp_path):
    problems = sum_problems(8)
    write_tasks(tmp_path, problems)
    args = f"model=demo-base,base_url={server.base_url}/v1/chat/completions,num_concurrent=2,max_retries=1"
    results, _ = lm_eval(tmp_path, "local-chat-completions", args, "sums_gen", "--apply_chat_template")
    answers = [openai_client.chat.completions.create(
        model="demo-base", messages=[{"role": "user", "content": p["question"]}], max_tokens=6, temperature=0,
    ).choices[0].message.content for p in problems]
    right = sum(answer.strip() == p["answer"] for answer, p in zip(answers, problems))
    assert results["exact_match,none"] == pytest.approx(right / len(problems))


def test_litellm_completion_chat_and_stream(server, openai_client):
    import litellm

    common = dict(model="openai/demo-base", api_base=f"{server.base_url}/v1", api_key="unused", temperature=0,
                  max_tokens=6)
    messages = [{"role": "user", "content": "123+456="}]
    expected = openai_client.chat.completions.create(model="demo-base", messages=messages, temperature=0,
                                                     max_tokens=6).choices[0].message.content
    assert litellm.completion(messages=messages, **common).choices[0].message.content == expected
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                       litellm.completion(messages=messages, stream=True, **common))
    assert streamed == expected
    text = litellm.text_completion(prompt="123+456=", **common).choices[0].text
    assert text == openai_client.completions.create(model="demo-base", prompt="123+456=", temperature=0,
                                                    max_tokens=6).choices[0].text


def test_vllm_bench_serve_smoke(server, tmp_path):
    """vLLM's own load generator (its `openai` backend sends repetition_penalty and probes /tokenize)."""
    for backend, endpoint in (("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")):
        run = subprocess.run(
            [sys.executable, "-m", "bench.vllm_cli", "bench", "serve", "--backend", backend, "--endpoint", endpoint,
             "--base-url", server.base_url, "--model", "demo-base", "--tokenizer", str(demo_base_dir()),
             "--dataset-name", "random", "--random-input-len", "8", "--random-output-len", "8",
             "--num-prompts", "8", "--max-concurrency", "4", "--save-result", "--result-dir", str(tmp_path),
             "--result-filename", f"{backend}.json"],
            capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        result = json.loads((tmp_path / f"{backend}.json").read_text())
        assert (result["completed"], result["failed"]) == (8, 0) and result["total_output_tokens"] > 0


class Person(BaseModel):
    name: str
    age: int


@pytest.mark.real_model
def test_langchain_invoke_stream_batch_and_structured_output(smollm2_server, smollm2_dir):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=smollm2_dir.name, base_url=f"{smollm2_server.base_url}/v1", api_key="unused",
                     temperature=0, max_tokens=24, max_retries=0)
    question = "What is 2+3? Answer with the number only."
    expected = httpx.post(f"{smollm2_server.base_url}/v1/chat/completions", timeout=120, json={
        "model": smollm2_dir.name, "messages": [{"role": "user", "content": question}], "temperature": 0,
        "max_tokens": 24}).json()["choices"][0]["message"]["content"]
    assert llm.invoke(question).content == expected
    assert "".join(chunk.content for chunk in llm.stream(question)) == expected
    assert [m.content for m in llm.batch([question, question])] == [expected, expected]
    person = llm.bind(max_tokens=60).with_structured_output(Person).invoke("Describe a person: name and age.")
    assert isinstance(person, Person) and person.name and math.isfinite(person.age)
