"""GuidanceBatch against an independent full-recompute reference, through joins, leaves and moves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from guidance.batch import GuidanceBatch
from guidance.catalog import GuideCatalog
from guidance.loading import load_guide_models
from guidance.spec import parse_guidance
from models.runtime import build_head, save_head
from tests.host_syncs import forbid_host_syncs

V, H = 64, 128
HEADS = {
    "value": {"type": "bernoulli", "scoring": "q"},
    "hist": {"type": "histogram", "scoring": "v", "atoms": [0.0, 0.5, 1.0]},
    "prefix": {"type": "expected", "scoring": "v"},
    "arm": {"type": "arm", "scoring": "q", "rank": 4},
    "rlm": {"type": "lm", "scoring": "q"},
}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> GuideCatalog:
    root = tmp_path_factory.mktemp("guides")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, initializer_range=0.2)
    paths = {}
    for i, (name, head) in enumerate(HEADS.items()):
        path = root / name
        torch.manual_seed(i)
        LlamaForCausalLM(config).save_pretrained(path)
        built = build_head(head, H, V)
        with torch.no_grad():
            for p in built.parameters():
                p.normal_(0, 0.3)
        save_head(built, path)
        paths[name] = path
    return GuideCatalog.from_paths(paths)


@pytest.fixture
def models(catalog):
    return load_guide_models(catalog, dtype=torch.float32, device="cpu")


def reference_kl(logits: torch.Tensor, offsets: torch.Tensor, temperature: float = 1.0) -> float:
    """KL(softmax((l + d) / T) || softmax(l / T)) of one row ``[V]``, from the definition; greedy
    (T = 0) is reported at T = 1."""
    t = temperature if temperature >= 1e-5 else 1.0
    log_p = torch.log_softmax(logits.double() / t, -1)
    log_q = torch.log_softmax((logits + offsets).double() / t, -1)
    return float((log_q.exp() * (log_q - log_p)).sum())


def reference_entropy(logits: torch.Tensor, temperature: float = 1.0) -> float:
    """H(softmax(l / T)) of one row from the definition; greedy (T = 0) at T = 1."""
    p = torch.softmax(logits.double() / (temperature if temperature >= 1e-5 else 1.0), -1)
    return float(-(p * p.log()).sum())


def reference_offsets(models, catalog, guidance, tokens: list[int], logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Offsets for one row by full recompute of the guide models over `tokens`; an entry whose
    `min_entropy` is above the base entropy at `temperature` adds nothing."""
    total = torch.zeros(V)
    for entry in guidance:
        if entry.params.strength == 0 or reference_entropy(logits, temperature) < entry.params.min_entropy:
            continue
        model, info = models[entry.params.model], catalog[entry.params.model]
        atoms = torch.tensor(info.atoms) if info.atoms else None
        k = V if entry.top_k == -1 else entry.top_k
        candidates = torch.topk(logits, k).indices
        strength = torch.tensor([[entry.params.strength]])
        with torch.no_grad():
            if info.scoring == "q":
                hidden = model.backbone.forward(torch.tensor([tokens]))[:, -1]
                scores = entry.module.token_scores(model.head(hidden, model.backbone.output_embedding))[0]
                candidate_scores = scores[candidates].unsqueeze(0)
            else:
                rows = torch.tensor([tokens + [c] for c in candidates.tolist()])
                candidate_scores = model.head(model.backbone.forward(rows)[:, -1:], None)[:, 0].unsqueeze(0)
        d = entry.module.offsets(candidate_scores, strength, info.head_type, atoms)[0]
        total[candidates] += d
    return total


SPECS = {
    "q": [{"type": "qsharp", "model": "value", "strength": 3.0, "top_k": 5}],
    "hist+cd": [{"type": "qsharp", "model": "hist", "strength": 2.0, "top_k": 4},
                {"type": "cd", "model": "prefix", "strength": 1.5, "top_k": 6}],
    "arm+genarm": [{"type": "arm", "model": "arm", "strength": 0.7},
                   {"type": "genarm", "model": "rlm", "strength": 0.5, "top_k": 10}],
    "zero": [{"type": "qsharp", "model": "value", "strength": 0.0}],
    "gated": [{"type": "qsharp", "model": "hist", "strength": 2.0, "top_k": 4, "min_entropy": 3.0}],
    "gated+arm": [{"type": "cd", "model": "prefix", "strength": 1.5, "top_k": 6, "min_entropy": 3.5},
                  {"type": "arm", "model": "arm", "strength": 0.7, "min_entropy": 2.0}],
    "hist+cd@0": [{"type": "qsharp", "model": "hist", "strength": 2.0, "top_k": 4, "min_entropy": 0},
                  {"type": "cd", "model": "prefix", "strength": 1.5, "top_k": 6, "min_entropy": 0.0}],
    # top-3, top-5 (one group, twice on a row), top-4 and top-2 of one row: offsets on the same tokens
    "same tokens": [{"type": "qsharp", "model": "value", "strength": 3.0, "top_k": 3},
                    {"type": "qsharp", "model": "value", "strength": 1.0, "top_k": 5},
                    {"type": "cd", "model": "prefix", "strength": 1.5, "top_k": 4},
                    {"type": "genarm", "model": "rlm", "strength": 0.5, "top_k": 2}],
    "q whole": [{"type": "qsharp", "model": "value", "strength": 2.0, "top_k": -1}],
}


class FakeEngine:
    """Drives a batch like vLLM does: rows, live output lists, greedy sampling on guided logits."""

    def __init__(self, batch: GuidanceBatch, catalog, models, seed: int = 0, spread: bool = False) -> None:
        self.batch, self.catalog, self.models = batch, catalog, models
        self.rows: dict[int, dict] = {}
        self.generator = torch.Generator().manual_seed(seed)
        self.spread = spread  # rows from peaked to flat: base entropies spread over (0, log V)
        self.expected_kl: dict[str, float] = {}
        self.expected_steps: dict[str, int] = {}

    def add(self, row: int, key: str, spec: str, prompt: list[int], temperature: float = 1.0) -> None:
        guidance = parse_guidance(SPECS[spec], self.catalog)
        request = {"key": key, "guidance": guidance, "prompt": prompt, "output": [], "temperature": temperature}
        self.rows[row] = request
        self.expected_kl[key] = 0.0
        self.expected_steps[key] = 0
        self.batch.add(row, key, guidance, prompt, request["output"], temperature=temperature)

    def remove(self, row: int) -> None:
        del self.rows[row]
        self.batch.remove(row)

    def move(self, source: int, target: int, swap: bool) -> None:
        a, b = self.rows.pop(source, None), self.rows.pop(target, None)
        if a is not None:
            self.rows[target] = a
        if swap and b is not None:
            self.rows[source] = b
        self.batch.move(source, target, swap)

    def step(self) -> None:
        size = max(self.rows) + 1
        logits = torch.randn(size, V, generator=self.generator)
        if self.spread:
            logits *= torch.rand(size, 1, generator=self.generator) * 6
        expected = logits.clone()
        for row, request in self.rows.items():
            d = reference_offsets(self.models, self.catalog, request["guidance"],
                                  request["prompt"] + request["output"], logits[row], request["temperature"])
            expected[row] = logits[row] + d
            self.expected_kl[request["key"]] += reference_kl(logits[row], d, request["temperature"])
            self.expected_steps[request["key"]] += any(
                e.params.strength > 0 and reference_entropy(logits[row], request["temperature"]) >= e.params.min_entropy
                for e in request["guidance"])
        out = self.batch.apply(logits.clone())
        assert torch.allclose(out, expected, atol=1e-4), (out - expected).abs().max()
        for row, request in self.rows.items():
            request["output"].append(int(out[row].argmax()))


def test_no_guided_rows_is_a_no_op(catalog, models):
    batch = GuidanceBatch(models, catalog, max_requests=4, max_len=32)
    logits = torch.randn(3, V)
    assert batch.apply(logits) is logits


def test_rows_join_leave_and_move_and_match_full_recompute(catalog, models):
    batch = GuidanceBatch(models, catalog, max_requests=4, max_len=64)
    engine = FakeEngine(batch, catalog, models)
    engine.add(0, "a", "q", [1, 5, 9])
    engine.step()
    engine.add(1, "b", "hist+cd", [1, 7])
    engine.add(2, "c", "arm+genarm", [1, 3, 3, 8, 2])
    engine.step()
    engine.step()
    engine.move(2, 1, swap=True)
    engine.step()
    engine.remove(0)
    engine.move(2, 0, swap=False)  # condense: b goes from row 2 to row 0
    engine.step()
    engine.add(2, "d", "q", [1, 4])  # reuses freed slots
    engine.step()
    engine.step()
    keys = ["a", "b", "c", "d"]
    reports = batch.collect(keys)
    assert set(reports) == set(keys)
    for key in keys:
        assert reports[key].kl == pytest.approx(engine.expected_kl[key], rel=1e-4, abs=1e-6)
    assert {k: r.steps for k, r in reports.items()} == {"a": 4, "b": 6, "c": 6, "d": 2}
    assert batch.collect(keys) == {}  # each report is handed out once


def test_strength_zero_rows_are_untouched(catalog, models):
    batch = GuidanceBatch(models, catalog, max_requests=2, max_len=16)
    batch.add(0, "z", parse_guidance(SPECS["zero"], catalog), [1, 2], [])
    assert batch.num_guided == 0
    logits = torch.randn(1, V)
    assert torch.equal(batch.apply(logits.clone()), logits)


def test_report_survives_preemption_and_resume(catalog, models):
    batch = GuidanceBatch(models, catalog, max_requests=2, max_len=32)
    engine = FakeEngine(batch, catalog, models, seed=3)
    engine.add(0, "p", "q", [1, 2, 3])
    engine.step()
    engine.step()
    request = engine.rows[0]
    engine.batch.remove(0)  # preempted: leaves the batch, output kept
    del engine.rows[0]
    engine.rows[1] = request
    batch.add(1, "p", request["guidance"], request["prompt"], request["output"],
              temperature=request["temperature"])  # resumes: guide caches re-prefilled
    engine.step()
    report = batch.collect(["p"])["p"]
    assert report.steps == 3
    assert report.kl == pytest.approx(engine.expected_kl["p"], rel=1e-4)


def test_partial_prefill_steps_are_not_counted(catalog, models):
    """A step that samples nothing (output unchanged) is overwritten by the one that samples."""
    batch = GuidanceBatch(models, catalog, max_requests=2, max_len=32)
    guidance = parse_guidance(SPECS["q"], catalog)
    output: list[int] = []
    batch.add(0, "k", guidance, [1, 2, 3, 4], output)
    batch.apply(torch.randn(1, V))  # a prefill chunk: nothing sampled
    logits = torch.randn(1, V)
    d = reference_offsets(models, catalog, guidance, [1, 2, 3, 4], logits[0])
    batch.apply(logits.clone())
    output.append(5)
    report = batch.collect(["k"])["k"]
    assert report.steps == 1
    assert report.kl == pytest.approx(reference_kl(logits[0], d), rel=1e-4)


def test_kl_is_reported_at_each_rows_sampling_temperature(catalog, models):
    """Rows at temperatures 0.5, 2 and 0 (greedy: reported at 1) in one batch, through joins,
    a swap, a condensing move and a temperature-1 row reusing a freed stat row."""
    batch = GuidanceBatch(models, catalog, max_requests=4, max_len=64)
    engine = FakeEngine(batch, catalog, models, seed=7)
    engine.add(0, "cold", "q", [1, 5, 9], temperature=0.5)
    engine.add(1, "hot", "arm+genarm", [1, 7], temperature=2.0)
    engine.add(2, "greedy", "hist+cd", [1, 3, 3], temperature=0.0)
    engine.step()
    engine.step()
    engine.move(2, 0, swap=True)
    engine.step()
    engine.remove(1)
    engine.move(2, 1, swap=False)
    engine.step()
    engine.add(2, "plain", "q", [1, 4])  # takes the stat row "hot" freed: its temperature is rewritten
    engine.step()
    reports = batch.collect(["cold", "hot", "greedy", "plain"])
    for key, report in reports.items():
        assert report.kl == pytest.approx(engine.expected_kl[key], rel=1e-4, abs=1e-6), key
    assert {k: r.steps for k, r in reports.items()} == {"cold": 5, "hot": 3, "greedy": 5, "plain": 1}


def test_temperature_changes_the_report_and_greedy_equals_temperature_one(catalog, models):
    """The same guided step reported at T = 0.5, 1, 2 and 0 (greedy): T = 0 is T = 1, the others differ."""
    guidance = parse_guidance(SPECS["q"], catalog)
    torch.manual_seed(5)
    logits = torch.randn(1, V) * 2
    d = reference_offsets(models, catalog, guidance, [1, 2, 3], logits[0])
    kls = {}
    for t in (0.5, 1.0, 2.0, 0.0):
        batch = GuidanceBatch(models, catalog, max_requests=1, max_len=8)
        output: list[int] = []
        batch.add(0, "k", guidance, [1, 2, 3], output, temperature=t)
        batch.apply(logits.clone())
        output.append(0)
        kls[t] = batch.collect(["k"])["k"].kl
        assert kls[t] == pytest.approx(reference_kl(logits[0], d, t), rel=1e-4, abs=1e-6), t
    assert kls[0.0] == kls[1.0]
    assert len({round(kls[t], 4) for t in (0.5, 1.0, 2.0)}) == 3


def test_bfloat16_guide_models_steer_like_float32(catalog, models):
    """`--guide-dtype bfloat16` (the default on GPUs): offsets computed by bfloat16 guide models stay
    float32 logits, finite, and close to the float32 models' offsets."""
    low = load_guide_models(catalog, dtype=torch.bfloat16, device="cpu")
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    outputs = {}
    for name, guides in (("float32", models), ("bfloat16", low)):
        batch = GuidanceBatch(guides, catalog, max_requests=3, max_len=32)
        for row, spec in enumerate(("q", "hist+cd", "arm+genarm")):
            batch.add(row, f"{name}-{row}", parse_guidance(SPECS[spec], catalog), [1, 5, 9], [], temperature=1.0)
        outputs[name] = batch.apply(logits.clone())
    assert outputs["bfloat16"].dtype == torch.float32 and torch.isfinite(outputs["bfloat16"]).all()
    offsets = {name: out - logits for name, out in outputs.items()}
    scale = offsets["float32"].abs().max()
    assert (offsets["bfloat16"] - offsets["float32"]).abs().max() <= 0.05 * scale + 0.05


def test_entropy_gate_steers_and_scores_only_uncertain_positions(catalog, models):
    """Gated entries add offsets only where the base entropy reaches their bound; the KL stays
    exact, `steps` counts the steered positions, and a V-type head scores only the open rows."""
    batch = GuidanceBatch(models, catalog, max_requests=4, max_len=64)
    scored_rows = []
    score_candidates = models["hist"].score_candidates

    def counting(slots, candidates):
        scored_rows.append(len(slots))
        return score_candidates(slots, candidates)

    models["hist"].score_candidates = counting
    engine = FakeEngine(batch, catalog, models, seed=11, spread=True)
    engine.add(0, "gated", "gated", [1, 5, 9], temperature=0.7)
    engine.add(1, "composed", "gated+arm", [1, 7])
    engine.add(2, "ungated", "hist+cd", [1, 3, 3])
    for _ in range(12):
        engine.step()
    reports = batch.collect(["gated", "composed", "ungated"])
    for key, report in reports.items():
        assert report.kl == pytest.approx(engine.expected_kl[key], rel=1e-4, abs=1e-6), key
        assert report.steps == engine.expected_steps[key], key
    assert 0 < reports["gated"].steps < 12 and 0 < reports["composed"].steps < 12  # the gates opened and closed
    assert reports["ungated"].steps == 12
    # hist scores the open steps of "gated" and every step of "ungated", nothing more
    assert sum(scored_rows) == reports["gated"].steps + 12


def test_min_entropy_zero_is_ungated_guidance(catalog, models):
    outcomes = []
    for spec in ("hist+cd", "hist+cd@0"):
        batch = GuidanceBatch(models, catalog, max_requests=2, max_len=64)
        engine = FakeEngine(batch, catalog, models, seed=4, spread=True)
        engine.add(0, "k", spec, [1, 2, 3])
        for _ in range(8):
            engine.step()
        outcomes.append((engine.rows[0]["output"], batch.collect(["k"])["k"]))
    assert outcomes[0] == outcomes[1]


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
