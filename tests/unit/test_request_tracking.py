"""Every request ends: deadlines, the stall watchdog, engine RPC and scorer timeouts, engine death, and the
state dump, on fake engines whose awaits never answer."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
import torch

from guidance.search.scorers import Scorer, ScorerCatalog
from guidance.search.spec import BestOfN
from server.api.completions.protocol import CompletionRequest
from server.api.completions.serving import CompletionServing
from server.api.generation import Prepared, PreparedPrompt
from server.api.streaming import SSE_DONE
from server.diagnostics import await_chain, state_dump
from server.engine import ChoiceDelta, Engine, SamplingOptions
from server.errors import DeadlineExceeded, EngineDead, EngineTimeout, RequestStalled, ScorerTimeout
from server.lifecycle import Lifecycle
from server.metrics import REQUESTS_ENDED
from server.search import Search
from server.services import Services
from server.tracking import RequestTracker, Stage, current_request, stage

PROMPT = PreparedPrompt([1, 2], "1+1=", SamplingOptions(max_tokens=4))


class ReportNeverComes:
    """One token, then the choice waits for a KL report that never comes (a lost worker reply)."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    def generate(self, request_id, prompt_ids, options):
        async def choice():
            record = current_request()
            record.engine_ids.add(f"{request_id}-0")
            try:
                record.progress()
                yield ChoiceDelta(index=0, text="1", token_ids=(5,), logprobs=None, finish_reason=None)
                record.engine_ids.clear()  # the engine finished it; only the report is missing
                with stage(Stage.WAITING_REPORT):
                    await asyncio.Event().wait()
            finally:
                self.closed.set()

        return choice()


def serving_for(engine) -> CompletionServing:
    return CompletionServing(Services(settings=None, engine=engine, renderer=None, catalog=None,
                                      scorers=ScorerCatalog([]), search=None, lifecycle=None, cache=None, tools=None,
                                      created=0, tracker=None))


def ended(reason: str) -> float:
    return REQUESTS_ENDED.labels(reason)._value.get()


def test_a_lost_report_ends_a_streamed_request_at_its_deadline_with_the_defined_error():
    engine = ReportNeverComes()
    body = CompletionRequest(model="m", prompt="1+1=", stream=True)
    before = ended("deadline_exceeded")

    async def run():
        record = RequestTracker(stall_timeout_s=60).open("cmpl-a", "text_completion", True, timeout_s=0.3)
        began = time.monotonic()
        events = [event async for event in serving_for(engine).stream(body, Prepared([PROMPT]), None, record)]
        return events, time.monotonic() - began, engine.closed.is_set()

    events, seconds, closed = asyncio.run(run())
    assert json.loads(events[-2][len("data: "):])["error"]["code"] == "deadline_exceeded"
    assert events[-1] == SSE_DONE
    assert 0.3 <= seconds < 2.0
    assert closed  # the engine stream was closed (its engine requests aborted)
    assert ended("deadline_exceeded") == before + 1


def test_a_lost_report_ends_a_whole_request_at_its_deadline():
    body = CompletionRequest(model="m", prompt="1+1=")

    async def run():
        record = RequestTracker(stall_timeout_s=60).open("cmpl-b", "text_completion", False, timeout_s=0.2)
        await serving_for(ReportNeverComes()).complete(body, Prepared([PROMPT]), record)

    with pytest.raises(DeadlineExceeded) as info:
        asyncio.run(run())
    assert info.value.status == 503 and "0.2 s" in info.value.message


def test_the_watchdog_ends_a_request_stuck_outside_the_engine_and_logs_where(caplog):
    """Stuck waiting for its report while the engine holds none of its requests: ended long before its deadline."""
    engine = ReportNeverComes()
    body = CompletionRequest(model="m", prompt="1+1=")
    tracker = RequestTracker(stall_timeout_s=0.2, holds=lambda ids: False)

    async def run():
        watchdog = asyncio.create_task(tracker.watch(interval_s=0.05))
        record = tracker.open("cmpl-c", "text_completion", False, timeout_s=60)
        try:
            await serving_for(engine).complete(body, Prepared([PROMPT]), record)
        finally:
            watchdog.cancel()

    began = time.monotonic()
    with pytest.raises(RequestStalled) as info:
        asyncio.run(run())
    assert time.monotonic() - began < 5
    assert "'waiting_report'" in info.value.message
    assert "request cmpl-c (text_completion) ended: request_stalled; stage waiting_report" in caplog.text


def test_the_watchdog_spares_a_request_the_engine_holds():
    held = {"r-0-0"}
    tracker = RequestTracker(stall_timeout_s=0.0, holds=lambda ids: bool(held & set(ids)))
    record = tracker.open("r", "chat.completion", False, timeout_s=60)
    record.engine_ids.add("r-0-0")
    now = time.monotonic() + 1
    assert tracker.stalled(now) == [] and tracker.snapshot()[0]["engine_holds"]
    held.clear()  # the engine lost it
    assert tracker.stalled(now) == [record]
    record.end(RequestStalled("stuck"))
    assert tracker.stalled(now) == []  # ended once


def test_a_request_shows_the_stage_it_is_most_blocked_on():
    record = RequestTracker(60).open("r", "chat.completion", True, timeout_s=60)
    assert record.stage is Stage.ADMITTED
    with record.in_stage(Stage.RUNNING):
        with record.in_stage(Stage.WAITING_REPORT):
            with record.in_stage(Stage.RUNNING):  # another choice, still generating
                assert record.stage is Stage.WAITING_REPORT
            with record.in_stage(Stage.SCORING):
                assert record.stage is Stage.SCORING
        assert record.stage is Stage.RUNNING
    record.progress()
    assert record.stage is Stage.STREAMING  # a streamed request between engine outputs


class SilentWorkers:
    """vLLM's AsyncLLM whose collective RPCs never answer."""

    vllm_config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=4))
    model_config = SimpleNamespace(dtype=torch.float32)
    errored = False

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        await asyncio.Event().wait()


def test_a_report_rpc_that_never_answers_fails_its_batch_with_engine_timeout_and_the_next_batch_is_fetched():
    engine = Engine(SilentWorkers(), max_model_len=64, start_seconds=0.0, guided=True, reply_rank=0,
                    rpc_timeout_s=0.1)
    options = SamplingOptions(max_tokens=4, guidance=({"type": "qsharp"},))

    async def run():
        first = await asyncio.gather(engine._guidance_report("a", options), engine._guidance_report("b", options),
                                     return_exceptions=True)
        second = await asyncio.gather(engine._guidance_report("c", options), return_exceptions=True)
        return first + second

    errors = asyncio.run(run())
    assert [type(e) for e in errors] == [EngineTimeout] * 3  # the batcher was not wedged by the lost reply
    assert "0.1 s" in errors[0].message and errors[0].code == "engine_timeout"


class StallingScorer(Scorer):
    name, kind, max_length = "stall", "verifier", None

    def __init__(self) -> None:
        self.release = __import__("threading").Event()

    def score(self, prompt_text, prompt_ids, completions, reference=None):
        self.release.wait(30)
        return [0.0] * len(completions)


class TwoTokenEngine:
    def generate(self, request_id, prompt_ids, options):
        async def choices():
            for index in range(options.n):
                yield ChoiceDelta(index=index, text="1", token_ids=(5,), logprobs=None, finish_reason="stop")

        return choices()


def test_a_scorer_that_stalls_fails_its_request_with_scorer_timeout():
    scorer = StallingScorer()
    search = Search(TwoTokenEngine(), ScorerCatalog([scorer]), lambda ids: "", scorer_timeout_s=0.2)
    spec = BestOfN(type="best_of_n", n=2, scorer="stall")

    async def run():
        return [d async for d in search.generate("r", [1], "p", SamplingOptions(max_tokens=2), spec)]

    try:
        with pytest.raises(ScorerTimeout) as info:
            asyncio.run(run())
    finally:
        scorer.release.set()
    assert info.value.code == "scorer_timeout" and "'stall'" in info.value.message


def test_after_the_engine_died_every_request_is_ended_and_new_ones_are_refused():
    tracker = RequestTracker(60)
    lifecycle = Lifecycle(max_waiting_requests=8, retry_after_s=1)
    records = [tracker.open(f"r{i}", "text_completion", False, timeout_s=60) for i in range(3)]
    before = ended("engine_dead")

    async def run():
        lifecycle.engine_died()
        return tracker.end_all(EngineDead)

    assert asyncio.run(run()) == 3
    assert all(isinstance(r.failure, EngineDead) and r.failure.status == 503 for r in records)
    assert ended("engine_dead") == before + 3
    assert lifecycle.exit_code == 1
    assert not lifecycle.should_exit(grace_s=60) and lifecycle.should_exit(grace_s=0)
    with pytest.raises(EngineDead):
        lifecycle.admit(1, capacity=4)


def test_the_state_dump_lists_an_in_flight_request_in_its_stage_and_the_task_awaiting_it():
    tracker = RequestTracker(60)

    async def run():
        record = tracker.open("cmpl-d", "text_completion", True, timeout_s=60)
        record.engine_ids.add("cmpl-d-0-0")
        started = asyncio.Event()

        async def waits_for_report():
            with record.in_stage(Stage.WAITING_REPORT):
                started.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(waits_for_report(), name="a guided choice")
        await started.wait()
        dump = state_dump(tracker)
        task.cancel()
        return dump

    dump = asyncio.run(run())
    [request] = dump["requests"]
    assert request["id"] == "cmpl-d" and request["stage"] == "waiting_report"
    assert request["engine_requests"] == ["cmpl-d-0-0"] and request["age_s"] >= 0
    [task] = [t for t in dump["tasks"] if t["name"] == "a guided choice"]
    assert "waits_for_report" in task["awaiting"][0]


def test_await_chain_follows_coroutines_and_async_generators_down_to_the_future():
    async def inner():
        await asyncio.Event().wait()
        yield 1

    async def outer():
        await anext(inner())

    async def run():
        task = asyncio.create_task(outer())
        await asyncio.sleep(0)
        chain = await_chain(task.get_coro())
        task.cancel()
        return chain

    chain = asyncio.run(run())
    assert "outer" in chain[0] and "inner" in chain[1] and "Event.wait" in chain[2]


class StuckEngine:
    """Alive, but its core stopped answering after a worker call timed out (a lost reply)."""

    alive, rpc_timed_out, rpc_timeout_s = True, True, 0.1

    async def responds(self) -> bool:
        await asyncio.sleep(self.rpc_timeout_s)
        return False


def test_an_engine_core_that_stops_answering_is_treated_as_dead(caplog):
    from server.app import watch_engine

    tracker = RequestTracker(60)
    lifecycle = Lifecycle(max_waiting_requests=8, retry_after_s=1)
    record = tracker.open("r", "text_completion", False, timeout_s=60)

    async def run():
        await asyncio.wait_for(watch_engine(StuckEngine(), tracker, lifecycle, interval_s=0.01), 5)

    asyncio.run(run())
    assert isinstance(record.failure, EngineDead) and lifecycle.exit_code == 1
    assert "did not answer within 0.1 s after a worker call timed out" in caplog.text


def test_a_timeout_s_over_the_cap_is_a_400_naming_it():
    from server.errors import InvalidRequest

    services = Services(settings=SimpleNamespace(request_timeout_s=600.0, max_request_timeout_s=3600.0), engine=None,
                        renderer=None, catalog=None, scorers=None, search=None, lifecycle=None, cache=None, tools=None,
                        created=0, tracker=None)
    assert services.request_timeout(None) == 600.0 and services.request_timeout(5.5) == 5.5
    with pytest.raises(InvalidRequest) as info:
        services.request_timeout(3601)
    assert info.value.param == "timeout_s" and "at most 3600" in info.value.message
