"""The soak's pure parts (bench/soak): how a request's end is classified, the invariant checks, the
measures, the server's sizing, the mix, and the load's bounds, on hand-made data."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from bench.faults.sitecustomize import STALL_VERIFIER
from bench.soak.checks import (check_all_ok, check_clean, check_exit, check_health_after_kill, check_killed_requests,
                               check_memory, check_no_hung, check_refusals, check_replays, check_restart,
                               check_stalled, check_zero, first_503_s, kill_answers, memory_growth_pct,
                               metric_by_label, metric_sum, missing_retry_after, replay_counts, throughput_windows)
from bench.soak.server import server_limits
from bench.soak.traffic import (Load, Offer, RequestRecord, RequestSpec, completion, is_clean, is_engine_dead, is_ok,
                                is_server_error, mix, mixed_requests, offer_from_listing, outcome, read_event)


def envelope(code: str | None, type_: str = "service_unavailable") -> dict:
    return {"message": "m", "type": type_, "param": None, "code": code}


def record(status: int | None = 200, *, stream: bool = False, started: float = 0.0, ended: float = 1.0,
           kind: str = "completion", **fields) -> RequestRecord:
    return RequestRecord(kind, stream, started, ended, status, **fields)


OK = record()
STREAMED = record(stream=True, done=True)
OVERLOADED = record(429, error=envelope("overloaded", "rate_limit_error"), retry_after="1")
DEAD = record(503, error=envelope("engine_dead"))
DEAD_STREAM = record(stream=True, error=envelope("engine_dead"), in_stream=True, done=True)


# How a request ended

@pytest.mark.parametrize("case, label", [
    (OK, "200"), (OVERLOADED, "429 overloaded"), (DEAD_STREAM, "200 stream-error engine_dead"),
    (record(None, hung=True), "hung"), (record(None, transport_error="ReadError: x"), "transport-error"),
    (record(stream=True, left=True), "left"), (record(500, error=None), "500"),
])
def test_outcome_labels(case, label):
    assert outcome(case) == label


@pytest.mark.parametrize("case, clean", [
    (OK, True), (STREAMED, True), (OVERLOADED, True), (DEAD, True), (DEAD_STREAM, True),
    (record(stream=True, left=True), True),
    (record(stream=True), False),  # a stream cut before [DONE]
    (record(429, error={"message": "busy"}), False),  # not the envelope
    (record(503, error=None), False),
    (record(500, error=envelope("x", "server_error")), False),
    (record(502, error=envelope("x")), False),
    (record(stream=True, error=envelope("engine_dead"), in_stream=True), False),  # no [DONE] after the error
    (record(stream=True, error=envelope(None, "server_error"), in_stream=True, done=True), False),
    (record(None, hung=True), False), (record(None, transport_error="ConnectError: refused"), False),
])
def test_clean_endings(case, clean):
    assert is_clean(case) is clean


def test_server_errors_are_500s_and_server_error_events_not_503s():
    assert is_server_error(record(500)) and is_server_error(record(504))
    assert is_server_error(record(stream=True, error=envelope(None, "server_error"), in_stream=True, done=True))
    assert not is_server_error(DEAD) and not is_server_error(DEAD_STREAM) and not is_server_error(OVERLOADED)


def test_engine_dead_needs_the_envelope_and_a_finished_stream():
    assert is_engine_dead(DEAD) and is_engine_dead(DEAD_STREAM)
    assert not is_engine_dead(record(503, error=envelope("draining")))
    assert not is_engine_dead(record(500, error=envelope("engine_dead")))
    assert not is_engine_dead(record(stream=True, error=envelope("engine_dead"), in_stream=True))


def test_ok_is_a_whole_200():
    assert is_ok(OK) and is_ok(STREAMED)
    assert not is_ok(record(stream=True)) and not is_ok(DEAD_STREAM) and not is_ok(record(200, hung=True))


def test_sse_events_fill_the_record():
    streamed = record(stream=True)
    assert read_event(streamed, json.dumps({"choices": [{"index": 0, "text": "12"}]})) == 1
    assert read_event(streamed, json.dumps({"choices": [{"index": 0, "delta": {"content": "3"}}]})) == 1
    assert read_event(streamed, json.dumps({"choices": [], "usage": {"completion_tokens": 3}})) == 1
    assert read_event(streamed, json.dumps({"error": envelope("engine_dead")})) == 0
    assert read_event(streamed, "[DONE]") == 0
    assert (streamed.text, streamed.completion_tokens, streamed.in_stream, streamed.done) == ("123", 3, True, True)


# Checks

def test_hung_and_unclean_requests_fail_their_checks():
    assert check_no_hung([OK, DEAD]).passed
    assert not check_no_hung([OK, record(None, hung=True, kind="chat")]).passed
    assert check_clean([OK, OVERLOADED, DEAD_STREAM, record(None, hung=True)]).passed  # hung: counted apart
    failed = check_clean([OK, record(500)])
    assert not failed.passed and "'500': 1" in failed.details


def test_replays_compare_pairs_by_kind():
    pairs = [record(kind="seeded-replay", replay_matched=True), record(kind="cached-replay", replay_matched=True),
             record(kind="seeded-replay", replay_matched=False), record(kind="seeded-replay")]
    counts = replay_counts(pairs)
    assert counts == {"compared": {"seeded-replay": 2, "cached-replay": 1}, "differ": {"seeded-replay": 1}}
    assert not check_replays(counts).passed
    assert check_replays(replay_counts(pairs[:2])).passed


def test_back_to_zero():
    assert check_zero("x", 0).passed and check_zero("x", 0.0).passed
    assert not check_zero("x", 2).passed and not check_zero("x", None).passed


def test_all_ok_ignores_clients_that_left_and_needs_a_request():
    assert check_all_ok("x", [OK, STREAMED, record(stream=True, left=True)]).passed
    assert not check_all_ok("x", [OK, OVERLOADED]).passed
    assert not check_all_ok("x", [OK, DEAD_STREAM]).passed
    assert not check_all_ok("x", []).passed


def test_refusals_need_429_with_retry_after_and_the_rest_200():
    assert check_refusals([OK, OVERLOADED, OVERLOADED]).passed
    assert not check_refusals([OK, OK]).passed  # nothing refused
    bare = record(429, error=envelope("overloaded", "rate_limit_error"))
    assert missing_retry_after([bare, OVERLOADED]) == 1 and not check_refusals([OK, bare]).passed
    assert not check_refusals([OVERLOADED, record(500)]).passed
    assert not check_refusals([OVERLOADED, record(None, hung=True)]).passed


def test_stalled_scorer_needs_503_scorer_timeout_in_time():
    timed_out = record(503, error=envelope("scorer_timeout"), started=10.0, ended=16.0)
    assert check_stalled(timed_out, 15.0).passed
    assert not check_stalled(timed_out, 5.0).passed
    assert not check_stalled(record(None, hung=True, started=10.0, ended=25.0), 15.0).passed
    assert not check_stalled(record(503, error=envelope("deadline_exceeded"), started=10.0, ended=12.0), 15.0).passed


def test_engine_kill_answers():
    killed_at = 100.0
    records = [
        record(started=90.0, ended=95.0),  # answered before the kill: not in flight
        record(503, error=envelope("engine_dead"), started=99.0, ended=101.0),
        record(stream=True, error=envelope("engine_dead"), in_stream=True, done=True, started=98.0, ended=103.5),
        record(started=99.5, ended=100.2),  # its answer was made before the engine died
        record(stream=True, left=True, started=99.0, ended=100.5),  # left by its client: not the server's
    ]
    answers = kill_answers(records, killed_at, 10.0)
    assert answers == {"in_flight": {"200": 1, "200 stream-error engine_dead": 1, "503 engine_dead": 1},
                       "engine_dead": 2, "late": 0, "other": 0, "slowest_answer_s": 3.5}
    assert check_killed_requests(answers, 10.0).passed

    late = kill_answers([*records, record(503, error=envelope("engine_dead"), started=99.0, ended=111.0)],
                        killed_at, 10.0)
    assert late["late"] == 1 and not check_killed_requests(late, 10.0).passed
    hung = kill_answers([*records, record(None, hung=True, started=99.0, ended=120.0)], killed_at, 10.0)
    assert hung["late"] == 1 and not check_killed_requests(hung, 10.0).passed
    wrong = kill_answers([*records, record(500, started=99.0, ended=101.0)], killed_at, 10.0)
    assert wrong["other"] == 1 and not check_killed_requests(wrong, 10.0).passed
    none_dead = kill_answers(records[:1] + records[3:], killed_at, 10.0)
    assert none_dead["engine_dead"] == 0 and not check_killed_requests(none_dead, 10.0).passed


def test_health_after_the_kill():
    probes = [(0.0, 200), (0.3, "ReadTimeout"), (0.6, 503)]
    assert first_503_s(probes) == 0.6 and check_health_after_kill(probes).passed
    refused = [(0.0, 200), (0.3, "ConnectError")]
    assert first_503_s(refused) is None and not check_health_after_kill(refused).passed


def test_exit_must_be_non_zero_and_in_time():
    assert check_exit(1, 5.5, 15.0).passed and check_exit(-9, 1.0, 15.0).passed
    assert not check_exit(0, 5.0, 15.0).passed
    assert not check_exit(1, 16.0, 15.0).passed
    assert not check_exit(None, None, 15.0).passed


def test_restart_within_the_first_start_time():
    assert check_restart(35.0, 38.0).passed
    assert check_restart(80.0, 38.0).passed  # 2 x 38 + 10 = 86
    assert not check_restart(90.0, 38.0).passed


# Measures

def test_memory_growth_in_percent_of_the_first_phase():
    growth = memory_growth_pct({"server_mib": 800.0, "children_mib": 3000.0},
                               {"server_mib": 880.0, "children_mib": 2850.0})
    assert growth == {"server": 10.0, "children": -5.0}
    assert check_memory(growth, 25.0).passed
    assert not check_memory({"server": 1.0, "children": 30.0}, 25.0).passed


def test_throughput_windows_compare_the_first_and_last_window():
    records = [record(ended=t, completion_tokens=10) for t in (1.0, 2.0, 3.0)] + \
              [record(ended=t, completion_tokens=20) for t in (997.0, 998.0)]
    windows = throughput_windows(records, 0.0, 1000.0, window_s=300.0)
    assert windows == {"window_s": 300.0, "first_tokens_per_s": 0.1, "last_tokens_per_s": 0.13,
                       "last_over_first": 1.3}
    assert throughput_windows(records, 0.0, 10.0, window_s=300.0)["window_s"] == 5.0  # half a short run
    assert throughput_windows(records, 5.0, 5.0) == {}


EXPOSITION = """\
# HELP alignserve_guide_kv_blocks_held Guide-model KV blocks admitted requests may fill.
# TYPE alignserve_guide_kv_blocks_held gauge
alignserve_guide_kv_blocks_held{model="demo-value"} 3.0
alignserve_guide_kv_blocks_held{model="demo-arm"} 2.0
# HELP alignserve_guide_kv_blocks KV-cache blocks of each guide model.
# TYPE alignserve_guide_kv_blocks gauge
alignserve_guide_kv_blocks{model="demo-value"} 256.0
# HELP alignserve_cache_requests_total Cache lookups.
# TYPE alignserve_cache_requests_total counter
alignserve_cache_requests_total{backend="redis",outcome="error"} 4.0
alignserve_cache_requests_total{backend="redis",outcome="hit"} 7.0
alignserve_cache_requests_created{backend="redis",outcome="hit"} 1.7e9
"""


def test_metrics_are_summed_by_label():
    assert metric_sum(EXPOSITION, "alignserve_guide_kv_blocks_held") == 5.0
    assert metric_sum(EXPOSITION, "alignserve_cache_requests", outcome="error") == 4.0
    assert metric_sum(EXPOSITION, "alignserve_cache_requests") == 11.0  # _created is not a count
    assert metric_sum(EXPOSITION, "alignserve_missing") == 0.0
    assert metric_by_label(EXPOSITION, "alignserve_guide_kv_blocks", "model") == {"demo-value": 256.0}


# Sizing and the mix

def test_limits_fit_the_mix_and_keep_the_budget_under_the_worst_case():
    limits = server_limits(64, 12, 512, 65536)
    # 64 guided requests of 12 + 16 tokens (2 blocks each); 64 clients x 4 candidates may wait.
    assert (limits.guide_kv_blocks, limits.max_waiting_requests, limits.max_num_seqs) == (128, 256, 16)
    assert limits.guide_kv_gib == pytest.approx(128.5 * 65536 / 2**30)
    big = server_limits(128, 50, 512, 65536)  # 128 x 5 blocks: twice that must stay under seqs x 32 blocks
    assert big.guide_kv_blocks == 640 and 2 * 640 < big.max_num_seqs * 32
    assert server_limits(32, 12, 512, None).guide_kv_gib is None


LISTING = {
    "modules": [{"type": "qsharp", "guide_heads": ["bernoulli", "histogram"], "parameters": {"strength": {}}},
                {"type": "cd", "guide_heads": ["expected", "bernoulli", "histogram"], "parameters": {"strength": {}}},
                {"type": "arm", "guide_heads": ["arm"], "parameters": {"strength": {}}},
                {"type": "genarm", "guide_heads": ["lm"], "parameters": {"strength": {}}},
                {"type": "contrast", "guide_heads": ["lm"], "parameters": {"strength": {}, "reference": {}}}],
    "guide_models": [{"name": "arm-model", "head": "arm", "scoring": "q"},
                     {"name": "prefix", "head": "expected", "scoring": "v"},
                     {"name": "value", "head": "bernoulli", "scoring": "q"}],
    "search": {"scorers": [{"name": "a-verifier", "kind": "verifier"}, {"name": STALL_VERIFIER, "kind": "verifier"},
                           {"name": "arm-model", "kind": "model", "head": "arm"},
                           {"name": "prefix", "kind": "model", "head": "expected"}]},
}


def test_offer_pairs_each_module_with_a_guide_and_skips_the_fault_scorer():
    offer = offer_from_listing("m", LISTING)
    assert [(e["type"], e["model"]) for e in offer.entries] == [("qsharp", "value"), ("cd", "prefix"),
                                                                 ("arm", "arm-model")]  # no lm guide
    lms = [{"name": "expert", "head": "lm", "scoring": "q"}, {"name": "untuned", "head": "lm", "scoring": "q"}]
    paired = offer_from_listing("m", {**LISTING, "guide_models": LISTING["guide_models"] + lms})
    assert {k: v for k, v in paired.entries[-1].items() if k != "strength"} == {
        "type": "contrast", "model": "expert", "reference": "untuned"}
    one_lm = offer_from_listing("m", {**LISTING, "guide_models": LISTING["guide_models"] + lms[:1]})
    assert [e["type"] for e in one_lm.entries] == ["qsharp", "cd", "arm", "genarm"]  # contrast needs two
    assert (offer.scorer, offer.value_scorer) == ("arm-model", "prefix")
    verifiers = LISTING["search"]["scorers"][:2]
    bare = offer_from_listing("m", {**LISTING, "guide_models": [], "search": {"scorers": verifiers}})
    assert bare.entries == () and (bare.scorer, bare.value_scorer) == ("a-verifier", None)


def test_the_mix_has_every_kind_and_cycles_through_it():
    builders = mix(offer_from_listing("m", LISTING))
    assert set(builders) == {
        "completion", "completion-stream", "chat", "chat-stream", "guided-qsharp", "guided-cd", "guided-arm",
        "composition", "structured", "best-of-n", "pruned", "blockwise", "cached-replay", "seeded-replay",
        "leave-mid-stream"}
    specs = list(mixed_requests(builders, ["1+1=", "2+2="], 30, 2 * len(builders)))
    assert len(specs) == 2 * len(builders) and {s.kind for s in specs} == set(builders)
    by_kind = {s.kind: s for s in specs}
    assert len(by_kind["composition"].body["guidance"]) == 2
    assert by_kind["pruned"].body["search"]["prune"]["scorer"] == "prefix"
    assert by_kind["seeded-replay"].replay and by_kind["seeded-replay"].body["cache"] is False
    assert by_kind["cached-replay"].replay and "cache" not in by_kind["cached-replay"].body
    assert by_kind["leave-mid-stream"].leave_after and by_kind["leave-mid-stream"].stream
    assert by_kind["completion-stream"].body["stream_options"] == {"include_usage": True}
    # Numbered from 30: kinds and prompts by number.
    assert [s.kind for s in specs[:3]] == ["completion", "completion-stream", "chat"]
    assert specs[0].body["prompt"] == "1+1=" and specs[1].body["prompt"] == "2+2="
    assert specs[2].body["messages"] == [{"role": "user", "content": "1+1="}]


# The load's bounds

def run_load(handler, specs, concurrency: int = 2, timeout_s: float = 5.0, duration_s: float = 30.0
             ) -> list[RequestRecord]:
    load = Load("http://soak.test", specs, concurrency, timeout_s, duration_s, transport=httpx.MockTransport(handler))
    return asyncio.run(load.run())


OFFER = Offer("m", (), "s", None)


def sse(*events: dict) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def test_whole_and_streamed_answers_are_read():
    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content).get("stream"):
            return httpx.Response(200, content=sse({"choices": [{"text": "4"}]}, {"choices": [{"text": "2"}]},
                                                   {"choices": [], "usage": {"completion_tokens": 2}}))
        return httpx.Response(200, json={"choices": [{"text": "42"}], "usage": {"completion_tokens": 2}})

    whole, streamed = run_load(handler, [completion(OFFER, "p"), completion(OFFER, "p", stream=True)], concurrency=1)
    assert (whole.status, whole.text, whole.completion_tokens) == (200, "42", 2) and is_ok(whole)
    assert (streamed.text, streamed.completion_tokens, streamed.done) == ("42", 2, True) and is_ok(streamed)


def test_errors_keep_their_envelope_and_retry_after():
    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content).get("stream"):
            return httpx.Response(200, content=sse({"choices": [{"text": "4"}]}, {"error": envelope("engine_dead")}))
        return httpx.Response(429, json={"error": envelope("overloaded", "rate_limit_error")},
                              headers={"Retry-After": "1"})

    refused, dead = run_load(handler, [completion(OFFER, "p"), completion(OFFER, "p", stream=True)], concurrency=1)
    assert outcome(refused) == "429 overloaded" and refused.retry_after == "1" and is_clean(refused)
    assert outcome(dead) == "200 stream-error engine_dead" and is_engine_dead(dead)


def test_a_client_leaves_after_its_chunks():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse(*({"choices": [{"text": str(i)}]} for i in range(10))))

    spec = RequestSpec("/v1/completions", {"stream": True}, leave_after=3)
    (left,) = run_load(handler, [spec], concurrency=1)
    assert left.left and left.text == "012" and not left.done and outcome(left) == "left"


def test_unanswered_requests_are_abandoned_as_hung():
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(200, json={})

    (hung,) = run_load(handler, [completion(OFFER, "p")], concurrency=1, timeout_s=0.2)
    assert hung.hung and outcome(hung) == "hung" and hung.latency_s < 5


def test_replays_are_sent_twice_and_compared():
    answers = iter(["a", "a", "b", "c"])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": [{"text": next(answers)}], "usage": {"completion_tokens": 1}})

    spec = RequestSpec("/v1/completions", {"seed": 1}, replay=True)
    records = run_load(handler, [spec, spec], concurrency=1)
    assert [r.replay_matched for r in records] == [None, True, None, False]


def test_loads_stop_at_their_count_and_their_time():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": [{"text": "x"}]})

    assert len(run_load(handler, [completion(OFFER, "p")] * 5, concurrency=2)) == 5
    assert run_load(handler, [completion(OFFER, "p")] * 5, duration_s=0.0) == []
