"""Prompt files and the rollout loop (roll-in, cut, roll-out, label) on a scripted engine."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from models.demo.build import demo_base_dir
from server.engine import ChoiceDelta, SamplingOptions
from server.prompts import PromptRenderer
from workflows.labels import verifier_labeller
from workflows.prompt_file import PromptRecord, chat_arith_prompts, read_prompts, write_prompts
from workflows.rollouts import RolloutSettings, generate_rollouts


class ScriptedEngine:
    """Answers every request with fixed token ids (digits of the demo tokenizer); records the calls."""

    def __init__(self, tokenizer, rollin_text: str, rollout_text: str) -> None:
        self.calls: list[tuple[str, list[int], SamplingOptions]] = []
        self._ids = {"in": tokenizer.encode(rollin_text, add_special_tokens=False),
                     "out": tokenizer.encode(rollout_text, add_special_tokens=False)}

    async def _stream(self, request_id: str, prompt_ids: list[int], options: SamplingOptions):
        self.calls.append((request_id, prompt_ids, options))
        ids = self._ids["in" if request_id.endswith("-in") else "out"][: options.max_tokens]
        yield ChoiceDelta(index=0, text="", token_ids=tuple(ids), logprobs=None, finish_reason="stop")

    def generate(self, request_id, prompt_ids, options):
        return self._stream(request_id, prompt_ids, options)


def test_prompt_files_round_trip_and_name_the_bad_line(tmp_path: Path) -> None:
    records = chat_arith_prompts("heldout")[:3] + [PromptRecord(id="plain", prompt="12+3=", answer="15")]
    # An answer is any JSON value: a number, a JSON schema, HumanEval's tests.
    records += [PromptRecord(id="n", prompt="1+1=", answer=2),
                PromptRecord(id="s", prompt="A name as JSON.", answer={"type": "object", "required": ["name"]}),
                PromptRecord(id="t", prompt="def f():", answer={"test": "assert f() == 1", "entry_point": "f"})]
    write_prompts(records, tmp_path / "p.jsonl")
    assert read_prompts(tmp_path / "p.jsonl") == records
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1="}\n{"prompt": "x", "messages": [{"role": "user", '
                                        '"content": "y"}]}\n')
    with pytest.raises(ValueError, match="line 2: prompt '2': give exactly one of 'messages' and 'prompt'"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "typo.jsonl").write_text(json.dumps({"promt": "1+1="}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: unknown fields \['promt'\]"):
        read_prompts(tmp_path / "typo.jsonl")


def test_base_rollouts_are_one_generation_cut_at_a_seeded_point() -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_base_dir())
    engine = ScriptedEngine(tokenizer, "579", "")
    prompts = [PromptRecord(id="a", prompt="123+456="), PromptRecord(id="b", prompt="1+1=")]
    settings = RolloutSettings(samples=2, max_tokens=8, seed=5)
    verifier = verifier_labeller("demo-verifier").scorer
    records = asyncio.run(generate_rollouts(engine, PromptRenderer(tokenizer), verifier, prompts, settings,
                                            progress=False)).records
    assert [r.group for r in records] == ["r1/a", "r1/a", "r1/b", "r1/b"]
    assert [r.reward for r in records] == [1.0, 1.0, 0.0, 0.0]
    assert [c[2].seed for c in engine.calls] == [5, 6, 7, 8] and all(not c[2].guidance for c in engine.calls)
    three = len(tokenizer.encode("579", add_special_tokens=False))
    assert [r.cut for r in records] == [random.Random(seed).randrange(three) for seed in (5, 6, 7, 8)]


def test_guided_rollin_is_cut_and_rolled_out_by_the_base() -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_base_dir())
    engine = ScriptedEngine(tokenizer, "588", "79")
    guidance = ({"type": "qsharp", "model": "v", "strength": 2.0},)
    settings = RolloutSettings(samples=1, max_tokens=8, seed=0)
    verifier = verifier_labeller("demo-verifier").scorer
    (record,) = asyncio.run(generate_rollouts(engine, PromptRenderer(tokenizer), verifier,
                                              [PromptRecord(id="a", prompt="123+456=")], settings, "r2", guidance,
                                              progress=False)).records
    rollin_call, rollout_call = engine.calls
    assert rollin_call[2].guidance == guidance and not rollout_call[2].guidance
    kept = tokenizer.encode("588", add_special_tokens=False)[: record.cut]
    assert rollout_call[1] == rollin_call[1] + kept  # the base continues from prompt + roll-in[:cut]
    assert rollout_call[2].max_tokens == 8 - record.cut
    assert list(record.completion_ids) == kept + tokenizer.encode("79", add_special_tokens=False)
    assert record.group == "r2/a" and record.reward == float(tokenizer.decode(record.completion_ids) == "579")
