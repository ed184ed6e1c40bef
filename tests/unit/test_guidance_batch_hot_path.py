"""GuidanceBatch's hot path: offsets of entries on the same tokens, output positions kept on the
device, and steps that build no tensor from host lists and read the host at most once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from guidance.batch import GuidanceBatch
from guidance.spec import parse_guidance
from tests.guidance_batch_reference import (  # noqa: F401  (catalog, models: fixtures)
    SPECS, V, FakeEngine, catalog, models, reference_kl, reference_offsets)
from tests.host_syncs import forbid_host_syncs


def test_offsets_of_entries_on_the_same_tokens_add_up(catalog, models):
    """Entries of one row on overlapping candidates (in one group and across groups) add their offsets
    on a token once each, and the KL is of their sum; a group whose rows want top-5 and every token
    steers densely."""
    batch = GuidanceBatch(models, catalog, max_requests=4, max_len=64)
    engine = FakeEngine(batch, catalog, models, seed=17, spread=True)
    engine.add(0, "same", "same tokens", [1, 5, 9], temperature=0.7)
    engine.add(1, "whole", "q whole", [1, 7])
    engine.add(2, "top5", "q", [2, 4, 6])
    engine.add(3, "mixed", "arm+genarm", [3, 1], temperature=0.0)
    for _ in range(4):
        engine.step()
    reports = batch.collect(list(engine.expected_kl))
    for key, report in reports.items():
        assert report.kl == pytest.approx(engine.expected_kl[key], rel=1e-4, abs=1e-6), key
        assert report.steps == 4


def test_kl_positions_stay_exact_through_prompt_chunks_rejoins_and_moves(catalog, models):
    """Each row's output position moves on the device while every row gets one new token per step; steps
    where a row has nothing new (its prompt's later chunks), joins, a rejoin and a move read it from the
    output lists again. Reports match a reference that keeps, per output position, the last step's KL."""
    batch = GuidanceBatch(models, catalog, max_requests=4, max_len=64)
    generator = torch.Generator().manual_seed(21)
    requests: dict[int, dict] = {}
    kl_at: dict[str, dict[int, float]] = {}

    def join(row: int, key: str, spec: str, prompt: list[int], output: list[int] | None = None) -> None:
        guidance = parse_guidance(SPECS[spec], catalog)
        requests[row] = {"key": key, "guidance": guidance, "prompt": prompt, "output": output or [], "t": 0.8}
        kl_at.setdefault(key, {})
        batch.add(row, key, guidance, prompt, requests[row]["output"], temperature=0.8)

    def step(chunked: tuple[int, ...] = ()) -> None:
        logits = torch.randn(max(requests) + 1, V, generator=generator)
        for row, r in requests.items():
            d = reference_offsets(models, catalog, r["guidance"], r["prompt"] + r["output"], logits[row], r["t"])
            kl_at[r["key"]][len(r["output"])] = reference_kl(logits[row], d, r["t"])
        out = batch.apply(logits.clone())
        for row, r in requests.items():
            if row not in chunked:  # a prompt chunk samples nothing
                r["output"].append(int(out[row].argmax()))

    join(0, "a", "q", [1, 5, 9])
    step()
    step()
    join(1, "b", "hist+cd", [1, 7, 7, 2, 4])
    step(chunked=(1,))
    step(chunked=(1,))
    step()
    step()
    step()
    a = requests.pop(0)
    batch.remove(0)  # preempted
    step()
    join(2, "a", "q", a["prompt"], a["output"])  # resumes with its output so far
    step()
    step()
    requests[0] = requests.pop(2)
    batch.move(2, 0, swap=False)
    step()
    step()
    reports = batch.collect(["a", "b"])
    for r in requests.values():
        expected = sum(kl for position, kl in kl_at[r["key"]].items() if position < len(r["output"]))
        assert reports[r["key"]].kl == pytest.approx(expected, rel=1e-4, abs=1e-6), r["key"]
        assert reports[r["key"]].steps == len(r["output"])


def _spy_on_tensors_from_lists(monkeypatch: pytest.MonkeyPatch) -> list:
    """`torch.tensor` records the data of every call made from the `guidance` package."""
    package = Path(GuidanceBatch.__module__.replace(".", "/")).parent.name
    made = []
    tensor = torch.tensor

    def spy(data, *args, **kwargs):
        if Path(sys._getframe(1).f_code.co_filename).parent.name == package:
            made.append(data)
        return tensor(data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", spy)
    return made


def test_a_steady_step_builds_only_the_new_tokens_tensors_and_reads_nothing_back(catalog, models, monkeypatch):
    """With the rows unchanged, `apply` builds one tensor from a host list per guide model (the engine's
    new tokens) and no other, and makes no device -> host read: sparse and dense groups, V- and Q-type,
    rows that are not 0..G-1."""
    batch = GuidanceBatch(models, catalog, max_requests=4, max_len=32)
    engine = FakeEngine(batch, catalog, models, seed=5)
    engine.add(0, "a", "q", [1, 5, 9], temperature=0.5)
    engine.add(1, "b", "hist+cd", [1, 7])
    engine.add(3, "c", "arm+genarm", [2, 3, 3])
    engine.step()  # prefill
    engine.step()  # the first step of the layout reads the positions
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(9))
    expected = logits.clone()
    for row, request in engine.rows.items():
        expected[row] += reference_offsets(models, catalog, request["guidance"], request["prompt"] + request["output"],
                                           logits[row], request["temperature"])
    with monkeypatch.context() as patch:
        made = _spy_on_tensors_from_lists(patch)
        forbid_host_syncs(patch)
        out = batch.apply(logits.clone())
    new = {key: [engine.rows[row]["output"][-1]] for row, key in ((0, "a"), (1, "b"), (3, "c"))}
    # the last sampled token of each row, once per guide model: value; hist and prefix; arm and rlm
    assert sorted(made) == sorted([new["a"], new["b"], new["b"], new["c"], new["c"]])
    assert torch.allclose(out, expected, atol=1e-4)


def test_a_gated_step_reads_the_host_once(catalog, models, monkeypatch):
    """Entropy gates: one device -> host read per step, for all gated entries together."""
    batch = GuidanceBatch(models, catalog, max_requests=3, max_len=32)
    engine = FakeEngine(batch, catalog, models, seed=6, spread=True)
    engine.add(0, "gated", "gated", [1, 5, 9])
    engine.add(1, "composed", "gated+arm", [1, 7])
    engine.add(2, "plain", "q", [2, 2])
    engine.step()
    engine.step()
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(2)) * torch.tensor([[0.1], [8.0], [1.0]])
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.shape) or tolist(self))
    batch.apply(logits)  # a flat row (gates open) and a peaked one (closed)
    monkeypatch.undo()
    assert reads == [torch.Size([3])]  # gated's hist entry, composed's cd and arm entries
