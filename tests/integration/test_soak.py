"""The soak and fault suite's short form (`python -m bench.soak --ci`, bench/soak) on the demo model:
the invariants it records in results.json hold, phase by phase.

One run serves every test (about 4 minutes on two cores). The soak exits 1 when a check failed:
each test below asserts one invariant, so a failure names the one that broke.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
SOAK_TIMEOUT_S = 780  # under pytest-timeout's 900 s, so that the soak is stopped, not orphaned
KILL_ANSWER_S = 10.0
KILL_EXIT_S = 15.0
PHASES = ("warm-up", "redis-kill", "guide-kv", "burst", "engine-kill", "restarted", "stalled-scorer")


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("soak") / "ci"
    process = subprocess.Popen([sys.executable, "-m", "bench.soak", "--ci", "--out", str(out)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=SOAK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.terminate()  # the soak stops its servers and Redis on SIGTERM
        output, _ = process.communicate(timeout=120)
        pytest.fail(f"the soak ran over {SOAK_TIMEOUT_S} s:\n{output[-4000:]}")
    # 0: every check passed; 1: some failed (the tests below say which); 2: the run itself broke.
    assert process.returncode in (0, 1), output[-6000:]
    result = json.loads((out / "results.json").read_text())
    assert (out / "report.md").read_text().startswith("# Soak")
    return result


def phase(result: dict, name: str) -> dict:
    return next(p for p in result["phases"] if p["name"] == name)


def served(result: dict) -> list[dict]:
    """The phases that end with the server up (all but the engine kill)."""
    return [p for p in result["phases"] if p["name"] != "engine-kill"]


def test_every_phase_ran_and_the_machine_is_recorded(soak):
    names = [p["name"] for p in soak["phases"]]
    assert soak["error"] is None
    assert set(PHASES) <= set(names) and any(n.startswith("soak-") for n in names), names
    assert "cpu_flags" in soak["machine"]


def test_no_request_hung(soak):
    assert {p["name"]: p["hung"] for p in soak["phases"] if p["hung"]} == {}


def test_no_500(soak):
    errors = {p["name"]: p["outcomes"] for p in soak["phases"] if p["server_errors"]
              or any(label.startswith("5") and not label.startswith("503 ") for label in p["outcomes"])}
    assert errors == {}


def test_transport_errors_are_none(soak):
    assert {p["name"]: p["outcomes"] for p in soak["phases"] if "transport-error" in p["outcomes"]} == {}


def test_engine_requests_and_guide_kv_blocks_return_to_zero(soak):
    settled = {p["name"]: p["settled"] for p in served(soak)}
    assert {n: s for n, s in settled.items() if s != {"unfinished_requests": 0, "guide_kv_blocks_held": 0}} == {}


def test_replays_match(soak):
    assert {p["name"]: p["replays"]["differ"] for p in soak["phases"] if p["replays"]["differ"]} == {}
    compared = [kind for p in soak["phases"] for kind in p["replays"]["compared"]]
    assert {"cached-replay", "seeded-replay"} <= set(compared)


def test_requests_succeed_while_redis_is_down(soak):
    redis = phase(soak, "redis-kill")
    assert set(redis["outcomes"]) <= {"200", "left"}, redis["outcomes"]
    assert redis["facts"]["cache_errors_counted"] > 0  # the outage happened while requests ran


def test_burst_refuses_the_excess_with_retry_after(soak):
    burst = phase(soak, "burst")
    assert set(burst["outcomes"]) == {"200", "429 overloaded"}, burst["outcomes"]
    assert burst["missing_retry_after"] == 0


def test_guide_kv_budget_refuses_cleanly(soak):
    budget = phase(soak, "guide-kv")
    assert "429 overloaded" in budget["facts"]["long_outcomes"], budget["facts"]
    assert set(budget["facts"]["long_outcomes"]) <= {"200", "429 overloaded"}
    assert budget["missing_retry_after"] == 0 and budget["passed"], budget["checks"]


def test_stalled_scorer_ends_503_scorer_timeout_in_time(soak):
    stall = phase(soak, "stalled-scorer")["facts"]
    assert stall["stalled_outcome"] == "503 scorer_timeout", stall
    assert stall["stalled_s"] <= stall["limit_s"], stall
    assert set(stall["after_outcomes"]) <= {"200", "left"}, stall


def test_engine_kill_answers_every_request_in_flight_with_engine_dead(soak):
    answers = phase(soak, "engine-kill")["facts"]["answers"]
    assert answers["engine_dead"] > 0 and answers["late"] == 0 and answers["other"] == 0, answers
    assert answers["slowest_answer_s"] <= KILL_ANSWER_S, answers


def test_engine_kill_health_answers_503(soak):
    facts = phase(soak, "engine-kill")["facts"]
    assert facts["health_first_503_s"] is not None, facts["health_probes"]


def test_engine_kill_server_exits_non_zero(soak):
    facts = phase(soak, "engine-kill")["facts"]
    assert facts["exit_code"] not in (None, 0) and facts["exit_s"] <= KILL_EXIT_S, facts


def test_restarted_server_serves_within_its_start_time(soak):
    restarted = phase(soak, "restarted")
    assert restarted["passed"], restarted["checks"]
    assert soak["starts_s"]["restarted"] and soak["starts_s"]["main"]
