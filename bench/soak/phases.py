"""The soak's phases (bench/soak): the mix, and each fault injected while load runs.

Each phase sends bounded load (in requests and in time), injects its fault, and records itself
through `Soak.finish` with its own checks ahead of those every phase gets.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import time
from collections import Counter
from dataclasses import replace

import httpx

from bench.faults.sitecustomize import STALL_MARKER, STALL_VERIFIER
from bench.soak.checks import (Check, check_all_ok, check_clean, check_exit, check_health_after_kill,
                               check_killed_requests, check_no_hung, check_refusals, check_restart, check_stalled,
                               first_503_s, kill_answers, metric_by_label, metric_sum, outcomes)
from bench.soak.report import Phase
from bench.soak.server import Soak, engine_core
from bench.soak.traffic import SEARCH_TOKENS, RequestRecord, RequestSpec, completion, outcome
from guidance.kv_budget import blocks_for

SERVER_MAX_N = 16  # the server's default --max-n
BURST_OVERSHOOT = 2.0  # a burst asks for this many times the engine requests the server admits
LONG_REQUESTS = 3  # guide-kv: requests sent together, each may fill over half the budget
LONG_LEAD_S = 0.5  # guide-kv: the long requests are admitted before the mix starts
STALL_GRACE_S = 10.0  # the stalled request must end within the scorer timeout + this
STALL_LOAD_CONCURRENCY = 8
KILL_AFTER_S = 2.0  # engine-kill: load runs this long before the kill
KILL_ANSWER_S = 10.0  # every request in flight answers within this after the kill
KILL_EXIT_S = 15.0  # the server exits within this after the kill
KILL_CUT_S = 20.0  # requests still unanswered this long after the kill are abandoned (hung)
HEALTH_PROBE_S = 0.1  # about one tick of uvicorn's main loop
FAULT_REQUESTS_PER_CLIENT = 100  # bound on the requests of a load that a fault, not a count, ends
MAX_ROUNDS = 1000
GUIDE_KV_BLOCKS = "alignserve_guide_kv_blocks"
CACHE_REQUESTS = "alignserve_cache_requests"


def mixed_phase(soak: Soak, name: str, concurrency: int) -> Phase:
    """The mix at `concurrency`: `requests_per_client` requests per client, within `round_max_s`."""
    began = time.monotonic()
    load = soak.load(soak.requests(concurrency * soak.plan.requests_per_client), concurrency, soak.plan.round_max_s)
    return soak.finish(name, concurrency, began, asyncio.run(load.run()))


def soak_rounds(soak: Soak) -> list[Phase]:
    """Rounds at each concurrency in turn for `minutes` (at least one round at each)."""
    levels = soak.plan.concurrency
    end = time.monotonic() + soak.plan.minutes * 60
    rounds = []
    for number in range(MAX_ROUNDS):
        if number >= len(levels) and time.monotonic() >= end:
            break
        concurrency = levels[number % len(levels)]
        rounds.append(mixed_phase(soak, f"soak-{number + 1}-c{concurrency}", concurrency))
    return rounds


async def _redis_outage(soak: Soak, concurrency: int) -> tuple[list[RequestRecord], dict]:
    """The mix for `fault_load_s`, Redis killed a quarter in and restarted at half: (records, facts)."""
    load = soak.load(soak.requests(concurrency * FAULT_REQUESTS_PER_CLIENT), concurrency, soak.plan.fault_load_s)
    running = asyncio.ensure_future(load.run())
    quarter = soak.plan.fault_load_s / 4
    await asyncio.sleep(quarter)
    errors = metric_sum(await asyncio.to_thread(soak.metrics), CACHE_REQUESTS, outcome="error")
    await asyncio.to_thread(soak.redis.kill)
    await asyncio.sleep(quarter)
    await asyncio.to_thread(soak.redis.start)
    records = await running
    errors = metric_sum(await asyncio.to_thread(soak.metrics), CACHE_REQUESTS, outcome="error") - errors
    return records, {"redis_down_s": round(quarter, 1), "cache_errors_counted": errors}


def redis_phase(soak: Soak) -> Phase:
    """Redis killed under load and restarted on its port: the cache fails open, every request succeeds."""
    concurrency, began = soak.plan.concurrency[0], time.monotonic()
    records, facts = asyncio.run(_redis_outage(soak, concurrency))
    seen = Check("the server saw Redis fail (cache errors counted)", facts["cache_errors_counted"] > 0,
                 f"{facts['cache_errors_counted']:g} cache errors")
    return soak.finish("redis-kill", concurrency, began, records,
                       [check_all_ok("every request succeeded while Redis was down", records), seen], facts)


def long_guided_request(soak: Soak, guide: dict, capacity: int) -> RequestSpec | None:
    """A guided request whose choices may fill over half of `capacity` guide-KV blocks, but fit in it
    (None when no request can: the prompt and context leave too few blocks per choice)."""
    prompt = soak.prompts[0]
    tokens = httpx.post(f"{soak.url}/tokenize", json={"model": soak.offer.model, "prompt": prompt},
                        timeout=30).json()["count"]
    max_tokens = soak.plan.max_model_len - tokens
    per_choice = blocks_for(tokens + max_tokens)
    n = min(capacity // per_choice, SERVER_MAX_N)
    if n < 1 or 2 * n * per_choice <= capacity:
        return None
    spec = completion(soak.offer, prompt, n=n, max_tokens=max_tokens, ignore_eos=True, cache=False, guidance=[guide])
    return replace(spec, kind="long-guided")


async def _budget_pressure(soak: Soak, long: RequestSpec, concurrency: int
                           ) -> tuple[list[RequestRecord], list[RequestRecord]]:
    """The long requests, and the mix beside them until they end: (long records, mixed records)."""
    longs = soak.load([long] * LONG_REQUESTS, LONG_REQUESTS, soak.plan.round_max_s)
    long_run = asyncio.ensure_future(longs.run())
    await asyncio.sleep(LONG_LEAD_S)
    mixed = soak.load(soak.requests(concurrency * FAULT_REQUESTS_PER_CLIENT), concurrency, soak.plan.round_max_s)
    mixed_run = asyncio.ensure_future(mixed.run())
    long_records = await long_run
    mixed.stop()
    return long_records, await mixed_run


def budgeted_guide(soak: Soak) -> tuple[dict, int] | None:
    """The first guidance entry whose guide model the budget bounds, and that model's blocks."""
    capacities = metric_by_label(soak.metrics(), GUIDE_KV_BLOCKS, "model")
    return next(((e, int(capacities[e["model"]])) for e in soak.offer.entries if e["model"] in capacities), None)


def guide_kv_phase(soak: Soak) -> Phase | None:
    """Guided requests that each may fill over half a guide model's KV budget, sent together beside the
    mix: while one holds the blocks the others get a clean 429. None without guide models."""
    if not soak.offer.entries or soak.limits.guide_kv_gib is None:
        return None
    concurrency, began = soak.plan.concurrency[0], time.monotonic()
    target = budgeted_guide(soak)
    long = None if target is None else long_guided_request(soak, *target)
    if long is None:
        return soak.finish("guide-kv", concurrency, began, [], [Check(
            "guided requests over the guide-KV budget refused", False,
            f"no guided request can fill over half of a budgeted guide model's blocks: {target}")])
    long_records, mixed_records = asyncio.run(_budget_pressure(soak, long, concurrency))
    guide, capacity = target
    return soak.finish("guide-kv", concurrency, began, long_records + mixed_records, [check_refusals(long_records)],
                       {"guide_model": guide["model"], "capacity_blocks": capacity, "long_n": long.body["n"],
                        "long_max_tokens": long.body["max_tokens"], "long_outcomes": outcomes(long_records),
                        "mixed_refused": sum(r.status == 429 for r in mixed_records)})


def burst_phase(soak: Soak) -> Phase:
    """More engine requests at once than --max-num-seqs + --max-waiting-requests admit: the excess gets
    429 with Retry-After, the rest 200."""
    admitted = soak.limits.max_num_seqs + soak.limits.max_waiting_requests
    count = math.ceil(BURST_OVERSHOOT * admitted / SERVER_MAX_N)
    spec = completion(soak.offer, soak.prompts[0], n=SERVER_MAX_N, ignore_eos=True, cache=False)
    began = time.monotonic()
    records = asyncio.run(soak.load([replace(spec, kind="burst")] * count, count, soak.plan.round_max_s).run())
    return soak.finish("burst", count, began, records, [check_refusals(records)],
                       {"engine_requests_admitted": admitted, "engine_requests_sent": count * SERVER_MAX_N})


async def _probe_health(url: str, killed_at: float, until_s: float) -> list[tuple[float, int | str]]:
    """/health every HEALTH_PROBE_S from the kill until it answers 503, or `until_s` after the kill:
    (seconds after the kill, status, or the error that took its place)."""
    probes: list[tuple[float, int | str]] = []
    async with httpx.AsyncClient(base_url=url, timeout=2) as client:
        while time.monotonic() - killed_at < until_s:
            try:
                status: int | str = (await client.get("/health")).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            probes.append((round(time.monotonic() - killed_at, 2), status))
            if status == 503:
                break
            await asyncio.sleep(HEALTH_PROBE_S)
    return probes


def _wait_exit(process: subprocess.Popen, killed_at: float, limit_s: float) -> tuple[int | None, float | None]:
    """(exit code, seconds after the kill), or (None, None) if the process still runs `limit_s` after it."""
    try:
        code = process.wait(timeout=max(0.0, killed_at + limit_s - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None, None
    return code, round(time.monotonic() - killed_at, 2)


async def _kill_engine(soak: Soak, concurrency: int) -> tuple[list[RequestRecord], list[Check], dict]:
    """The mix, the engine core SIGKILLed `KILL_AFTER_S` into it, then /health and the server's exit
    watched while the requests in flight are answered: (records, checks, facts)."""
    load = soak.load(soak.requests(concurrency * FAULT_REQUESTS_PER_CLIENT), concurrency, soak.plan.round_max_s)
    running = asyncio.ensure_future(load.run())
    await asyncio.sleep(KILL_AFTER_S)
    core = engine_core(soak.server.process.pid)
    if core is None:
        load.stop()
        return await running, [Check("the engine core was found", False, "no VLLM::EngineCore child")], {}
    killed_at = time.monotonic()
    core.kill()
    load.stop()
    probes, (code, exit_s) = await asyncio.gather(
        _probe_health(soak.url, killed_at, KILL_ANSWER_S),
        asyncio.to_thread(_wait_exit, soak.server.process, killed_at, KILL_EXIT_S))
    await asyncio.wait({running}, timeout=max(0.0, killed_at + KILL_CUT_S - time.monotonic()))
    load.cut()  # whatever is still in flight is abandoned: hung
    records = await running
    answers = kill_answers(records, killed_at, KILL_ANSWER_S)
    before = [r for r in records if not r.hung and r.ended < killed_at]
    checks = [replace(check_clean(before), name="requests answered before the kill ended cleanly"),
              check_killed_requests(answers, KILL_ANSWER_S), check_health_after_kill(probes),
              check_exit(code, exit_s, KILL_EXIT_S)]
    return records, checks, {"answers": answers, "health_first_503_s": first_503_s(probes),
                             "health_probes": dict(Counter(str(status) for _, status in probes)),
                             "exit_code": code, "exit_s": exit_s}


def engine_kill_phase(soak: Soak) -> Phase:
    """The engine core SIGKILLed under load; then the server is stopped if it still runs."""
    concurrency, began = soak.plan.concurrency[0], time.monotonic()
    records, checks, facts = asyncio.run(_kill_engine(soak, concurrency))
    seconds = time.monotonic() - began
    soak.stop()
    hung = check_no_hung(records)
    return soak.record(Phase("engine-kill", soak.server_name, concurrency, round(seconds, 2), records,
                             [replace(hung, details=f"{hung.details} (abandoned {KILL_CUT_S:g} s after the kill)"),
                              *checks], began, facts=facts))


def restarted_phase(soak: Soak) -> Phase:
    """The server started again after the engine kill (as a supervisor would), then the mix."""
    soak.start("restarted")
    restart = check_restart(soak.starts["restarted"], soak.starts["main"])
    concurrency, began = soak.plan.concurrency[0], time.monotonic()
    load = soak.load(soak.requests(concurrency * soak.plan.requests_per_client), concurrency, soak.plan.round_max_s)
    return soak.finish("restarted", concurrency, began, asyncio.run(load.run()), [restart],
                       {"start_s": soak.starts["restarted"], "first_start_s": soak.starts["main"]})


async def _stall(soak: Soak, spec: RequestSpec) -> tuple[list[RequestRecord], RequestRecord, list[RequestRecord]]:
    """(light load beside the stalled request, the stalled request, the mix sent after it ended)."""
    background = soak.load(soak.requests(STALL_LOAD_CONCURRENCY * FAULT_REQUESTS_PER_CLIENT),
                           STALL_LOAD_CONCURRENCY, spec.timeout_s)
    running = asyncio.ensure_future(background.run())
    stalled = (await soak.load([spec], 1, spec.timeout_s).run())[0]
    background.stop()
    concurrency = soak.plan.concurrency[0]
    after = soak.load(soak.requests(concurrency), concurrency, soak.plan.round_max_s)
    return await running, stalled, await after.run()


def stall_phase(soak: Soak) -> Phase:
    """A best-of-N whose scorer hangs (bench/faults) beside light load, then the mix again."""
    limit = soak.plan.scorer_timeout_s + STALL_GRACE_S
    spec = completion(soak.offer, f"{STALL_MARKER} {soak.prompts[0]}", max_tokens=SEARCH_TOKENS, cache=False,
                      search={"type": "best_of_n", "n": 2, "scorer": STALL_VERIFIER})
    began = time.monotonic()
    background, stalled, after = asyncio.run(_stall(soak, replace(spec, kind="stalled-scorer", timeout_s=limit)))
    return soak.finish("stalled-scorer", STALL_LOAD_CONCURRENCY, began, [*background, stalled, *after],
                       [check_stalled(stalled, limit), check_all_ok("requests after the stall served", after)],
                       {"stalled_outcome": outcome(stalled), "stalled_s": round(stalled.latency_s, 2),
                        "limit_s": limit, "after_outcomes": outcomes(after)})
