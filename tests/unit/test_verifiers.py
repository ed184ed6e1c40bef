"""Rule-based verifiers: the registry, references, the built-ins on hand-made cases, the sandbox, plug-ins."""

from __future__ import annotations

import asyncio
import logging
import textwrap
import time
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import pytest

from guidance.errors import GuidanceError
from guidance.search.scorers import Completion, ScorerCatalog, VerifierScorer
from guidance.search.spec import SearchLimits, parse_search
from guidance.verifiers import (
    ENTRY_POINT_GROUP,
    MissingReferenceError,
    UnknownVerifierError,
    answer_extractor,
    answers,
    error_counts,
    get_verifier,
    register_verifier,
    registry,
    resolve_verifier,
    verifier_names,
)
from guidance.verifiers.python_tests import PythonTests
from guidance.verifiers.sandbox import SandboxLimits, run_python
from models.tasks import chat_arith
from server.errors import InvalidRequest
from server.services import Services

ARITH_PROMPT = "<|im_start|>user\nWhat is 12+19? Answer with the number only.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register into a copy of the table, so other tests see the original."""
    verifier_names()  # plug-ins (if any are installed) loaded into the original first
    monkeypatch.setattr(registry, "_VERIFIERS", dict(registry._VERIFIERS))


# The registry.

def test_demo_verifier_registered_and_scores() -> None:
    assert "demo-verifier" in verifier_names()
    verify = get_verifier("demo-verifier")
    assert verify("12+34=", "46") == 1.0
    assert verify("<s><|user|>3-10=<|assistant|>", "-7</s>") == 1.0
    assert verify("12+34=", "45") == 0.0
    assert verify("12+34=", "46", reference="45") == 1.0  # it reads the question, not the reference


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(UnknownVerifierError) as info:
        get_verifier("no-such-verifier")
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "no-such-verifier" in message
    assert "demo-verifier" in message


def test_register_and_duplicate(isolated: None) -> None:
    name = "test-length-verifier"

    def by_length(prompt: str, completion: str) -> float:
        return float(len(completion))

    register_verifier(name, by_length)
    assert get_verifier(name)("p", "abc") == 3.0
    assert name in verifier_names()
    with pytest.raises(ValueError, match=name):
        register_verifier(name, by_length)
    with pytest.raises(ValueError, match="demo-verifier"):
        register_verifier("demo-verifier", by_length)


def test_arith_first_line_reads_the_last_integer_of_the_first_line() -> None:
    verify = get_verifier("arith-first-line")
    prompt = ARITH_PROMPT
    assert verify(prompt, "12 + 19 = 31") == 1.0
    assert verify(prompt, "\n31.\nI hope that helps, 12") == 1.0  # blank lines before the first line are skipped
    assert verify(prompt, "31 is wrong, it is 30") == 0.0
    assert verify(prompt, "thirty-one") == 0.0
    assert verify("What is the capital of France?", "31") == 0.0  # no question, no reward
    assert answer_extractor("arith-first-line")("12 + 19 = 31\n7") == 31
    assert answer_extractor("demo-verifier")("-7 and 8") == -7


def test_chat_arith_holds_out_a_fifth_of_the_grid() -> None:
    train, held_out = chat_arith.problems("train"), chat_arith.problems("heldout")
    assert (len(train), len(held_out)) == (720, 180)
    assert not {(p.a, p.b) for p in train} & {(p.a, p.b) for p in held_out}
    assert all((31 * p.a + p.b) % 5 == 0 for p in held_out)
    with pytest.raises(ValueError, match="split"):
        chat_arith.problems("test")


def test_a_verifier_sees_the_reference_and_one_that_needs_it_must_get_it(isolated: None) -> None:
    seen = []

    def records(prompt: str, completion: str, reference: object) -> float:
        seen.append(reference)
        return 1.0

    verify = register_verifier("test-records", records, needs_reference=True)
    assert verify("p", "c", {"any": ["json", 1]}) == 1.0 and seen == [{"any": ["json", 1]}]
    with pytest.raises(MissingReferenceError, match="test-records"):
        verify("p", "c")
    assert [get_verifier(n).needs_reference for n in ("math", "exact", "regex", "json-schema", "python-tests")] \
        == [True] * 5
    assert not get_verifier("demo-verifier").needs_reference and not get_verifier("arith-first-line").needs_reference


def test_a_verifier_that_raises_scores_0_is_logged_and_counted(isolated: None, caplog) -> None:
    from prometheus_client import generate_latest

    import server.metrics  # noqa: F401  (registers alignserve_verifier_errors_total)

    def broken(prompt: str, completion: str, reference: object) -> float:
        if completion == "nan":
            return float("nan")
        raise RuntimeError("no luck")

    verify = register_verifier("test-broken", broken)
    with caplog.at_level(logging.WARNING, logger="guidance.verifiers.registry"):
        assert verify("p", "c") == 0.0 and verify("p", "nan") == 0.0
    assert verify.errors == 2 and error_counts()["test-broken"] == 2
    assert "'test-broken' failed (scored 0): RuntimeError: no luck" in caplog.text
    assert 'alignserve_verifier_errors_total{verifier="test-broken"} 2.0' in generate_latest().decode()
    # In search, the scorer scores the failed candidate 0 and the others as usual.
    scorer = VerifierScorer("test-broken", verify)
    assert scorer.score("p", [], [Completion("c", ()), Completion("nan", ())]) == [0.0, 0.0]
    assert verify.errors == 4


def test_a_verifier_that_raises_does_not_stop_rollouts(isolated: None) -> None:
    from transformers import AutoTokenizer

    from models.demo.build import demo_base_dir
    from server.engine import ChoiceDelta
    from server.prompts import PromptRenderer
    from workflows.prompt_file import PromptRecord
    from guidance.search.scorers import VerifierScorer
    from workflows.rollouts import RolloutSettings, generate_rollouts

    tokenizer = AutoTokenizer.from_pretrained(demo_base_dir())

    class Engine:
        def generate(self, request_id, prompt_ids, options):
            async def one():
                yield ChoiceDelta(index=0, text="", token_ids=tuple(tokenizer.encode("12", add_special_tokens=False)),
                                  logprobs=None, finish_reason="stop")
            return one()

    references = []

    def half_broken(prompt: str, completion: str, reference: object) -> float:
        references.append(reference)
        if reference == "boom":
            raise ValueError("bad reference")
        return float(completion == reference)

    verify = register_verifier("test-half-broken", half_broken, needs_reference=True)
    prompts = [PromptRecord(id="a", prompt="10+2=", answer="12"), PromptRecord(id="b", prompt="1+1=", answer="boom")]
    labelled = asyncio.run(generate_rollouts(Engine(), PromptRenderer(tokenizer), VerifierScorer(verify.name, verify),
                                             prompts, RolloutSettings(samples=2, max_tokens=4), progress=False))
    assert [r.reward for r in labelled.records] == [1.0, 1.0, 0.0, 0.0] and verify.errors == 2
    assert labelled.unscored == 0  # a verifier's failure is its 0, not a failed call
    assert sorted(references) == ["12", "12", "boom", "boom"]  # prompts are labelled concurrently


# The built-ins on hand-made cases.

def test_exact_normalises_and_accepts_a_list() -> None:
    verify = get_verifier("exact")
    assert verify("p", "  Paris \n", "paris") == 1.0
    assert verify("p", "New   York\tCity", "new york city") == 1.0
    assert verify("p", "Lyon", ["Paris", "lyon"]) == 1.0
    assert verify("p", "Paris.", "Paris") == 0.0
    before = verify.errors
    assert verify("p", "Paris", 3) == 0.0 and verify("p", "Paris", []) == 0.0  # a bad reference
    assert verify.errors == before + 2


def test_regex_searches_and_a_bad_or_runaway_pattern_scores_0(monkeypatch, caplog) -> None:
    verify = get_verifier("regex")
    assert verify("p", "The answer is 42.", r"answer is \d+") == 1.0
    assert verify("p", "The answer is 42.", r"\A\d+\Z") == 0.0  # anchored: the whole completion
    assert verify("p", "Hello World", "(?i)world") == 1.0
    before = verify.errors
    with caplog.at_level(logging.WARNING, logger="guidance.verifiers.registry"):
        assert verify("p", "x", "(unclosed") == 0.0
    assert "'regex' failed" in caplog.text and "missing )" in caplog.text
    monkeypatch.setattr(answers, "REGEX_TIMEOUT_S", 1.0)
    began = time.monotonic()
    assert verify("p", "a" * 40 + "!", "(a+)+b") == 0.0  # catastrophic backtracking: the worker is killed
    assert time.monotonic() - began < 10 and verify.errors == before + 2
    assert verify("p", "ab", "(a+)+b") == 1.0  # a fresh worker answers the next call


def test_json_schema_reads_json_or_a_fenced_block() -> None:
    verify = get_verifier("json-schema")
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name"], "additionalProperties": False}
    assert verify("p", '{"name": "Ada", "age": 36}', schema) == 1.0
    assert verify("p", 'Here it is:\n```json\n{"name": "Ada"}\n```\nDone.', schema) == 1.0
    assert verify("p", '{"name": "Ada", "age": "36"}', schema) == 0.0
    assert verify("p", '{"age": 36}', schema) == 0.0
    assert verify("p", "not json", schema) == 0.0
    assert verify("p", "[" * 100_000, schema) == 0.0  # nested past the parser's depth: not JSON
    assert verify("p", "3", True) == 1.0 and verify("p", "3", {"type": "string"}) == 0.0
    before = verify.errors
    assert verify("p", "{}", {"type": "no-such-type"}) == 0.0  # an invalid schema: counted
    assert verify("p", "{}", "not a schema") == 0.0
    assert verify.errors == before + 2


@pytest.mark.parametrize(("completion", "reference", "reward"), [
    ("The answer is 42", "42", 1.0),
    ("The answer is $\\boxed{42}$.", 42, 1.0),
    ("So the result is \\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1.0),
    ("It is 0.5", "1/2", 1.0),
    ("The total is 1,234,567 dollars", "1234567", 1.0),
    ("$\\frac{\\sqrt{2}}{2}$", "\\sqrt{2}/2", 1.0),
    ("We get $(x+1)^2$", "x^2+2x+1", 1.0),
    ("The answer is 41", "42", 0.0),
    ("forty-two", "42", 0.0),
    ("The answer is $2+\\sqrt{3}$", "2+\\sqrt{3}", 1.0),  # a LaTeX reference is read whole, not as "2"
    ("It is 2", "2+\\sqrt{3}", 0.0),
    ("-3/4", "-0.75", 1.0),  # a fraction, a negative number and a percentage are numbers
    ("12.5%", "0.125", 1.0),
    ("18 + 17 is a classic problem", "35", 0.0),  # an expression restating the question is not a number's answer
    ("$5 \\times 7$", "35", 0.0),
    ("$2^3$", "8", 0.0),
])
def test_math_compares_final_answers(completion: str, reference: object, reward: float) -> None:
    assert get_verifier("math")("p", completion, reference) == reward


def test_math_bad_references_and_runaway_answers_score_0(monkeypatch) -> None:
    verify = get_verifier("math")
    before = verify.errors
    assert verify("p", "42", True) == 0.0 and verify("p", "42", ["42"]) == 0.0
    monkeypatch.setattr(answers, "MATH_TIMEOUT_S", 2.0)
    began = time.monotonic()
    # A power reference, so the answer is compared by value: sympy would compute for ever, holding the GIL.
    assert verify("p", "\\boxed{9^{9^{9^{9}}}}", "2^{10}") == 0.0
    assert time.monotonic() - began < 15 and verify.errors == before + 3
    assert verify("p", "5", "5") == 1.0


COMPLETIONS_FOR_31 = ["31", "31.", "The answer is 31", "12 + 19 = 31", "\\boxed{31}", "$31$", "30", "The answer is 13",
                      "12 + 19 = 30", "thirty-one", "", "31!", "12 + 19 is a classic sum", "The number is 12+19."]


@pytest.mark.parametrize("completion", COMPLETIONS_FOR_31)
def test_math_with_the_prompt_files_answer_agrees_with_arith_first_line(completion: str) -> None:
    """On one-line chat-arith replies both read the same final number."""
    from workflows.prompt_file import chat_arith_prompts

    record = next(r for r in chat_arith_prompts("all") if r.id == "12+19")
    prompt = "\n".join(m["content"] for m in record.messages)
    assert get_verifier("math")(prompt, completion, record.answer) == get_verifier("arith-first-line")(prompt,
                                                                                                      completion)


def test_math_and_arith_first_line_differ_on_later_lines() -> None:
    """arith-first-line reads the first line only; math the completion's final answer."""
    assert get_verifier("arith-first-line")(ARITH_PROMPT, "31\nI hope that helps, 12") == 1.0
    assert get_verifier("math")(ARITH_PROMPT, "31\nI hope that helps, 12", "31") == 0.0
    assert get_verifier("arith-first-line")(ARITH_PROMPT, "Let me think.\nThe answer is 31") == 0.0
    assert get_verifier("math")(ARITH_PROMPT, "Let me think.\nThe answer is 31", "31") == 1.0


# python-tests and its sandbox.

ADD_TESTS = {"test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
             "entry_point": "add"}
ADD = "def add(a, b):\n    return a + b\n"
LIMITS = SandboxLimits(time_s=2.0, memory_bytes=512 << 20, output_bytes=4096, file_bytes=1 << 16)


def test_python_tests_pass_and_fail_on_plain_cases() -> None:
    verify = get_verifier("python-tests")
    assert verify("p", f"Here you go:\n```python\n{ADD}```\nIt adds.", ADD_TESTS) == 1.0
    assert verify("p", ADD, "assert add(2, 2) == 4") == 1.0  # a plain string of asserts
    assert verify("p", ADD.replace("+", "-"), ADD_TESTS) == 0.0
    assert verify("p", "    return a + b\n", {**ADD_TESTS, "prompt": "def add(a, b):\n"}) == 1.0  # HumanEval's shape
    before = verify.errors
    assert verify("p", ADD, {"test": "x"}) == 0.0 and verify("p", ADD, {**ADD_TESTS, "entry_point": "a; b"}) == 0.0
    assert verify.errors == before + 2


HOSTILE = {
    "infinite loop": "while True:\n    pass\n",
    "sleeps past the limit": "import time\ntime.sleep(60)\n",
    "fork bomb": "import os\nwhile True:\n    os.fork()\n",
    "huge output": "while True:\n    print('x' * 10_000)\n",
    "huge memory": "hog = bytearray(4 << 30)\n",
    "huge file": "open('big.bin', 'wb').write(b'x' * (8 << 20))\n",
    "exits early": "import sys\nsys.exit(0)\n",
    "exits early, hard": "import os\nos._exit(0)\n",
    "starts a process": "import subprocess\nsubprocess.run(['true'])\n",
    "opens a socket": "import socket\nsocket.create_connection(('127.0.0.1', 1), timeout=1)\n",
    "signals its parent": "import os\nos.kill(os.getppid(), 0)\n",
    "loads native code": "import ctypes\nctypes.CDLL(None).getpid()\n",
    "lifts its limits": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_code_scores_0_within_its_limits(name: str) -> None:
    began = time.monotonic()
    assert PythonTests(LIMITS)("p", HOSTILE[name] + ADD, ADD_TESTS) == 0.0
    assert time.monotonic() - began < LIMITS.time_s + 3


def test_writes_outside_the_working_directory_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    code = f"open({str(outside)!r}, 'w').write('x')\n" + ADD
    assert PythonTests(LIMITS)("p", code, ADD_TESTS) == 0.0
    assert not outside.exists()
    result = run_python(f"import os\nos.remove({str(tmp_path / 'keep')!r})\n", LIMITS)
    assert not result.passed and "outside the working directory" in result.output
    inside = run_python("open('scratch.txt', 'w').write('ok')\nimport shutil, os\nos.mkdir('d')\nshutil.rmtree('d')\n",
                        LIMITS)
    assert inside.passed, inside.output


def test_the_environment_is_not_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGNSERVE_TEST_CANARY", "secret-canary")
    sees_it = "import os\nassert os.environ.get('ALIGNSERVE_TEST_CANARY') == 'secret-canary'\n" + ADD
    assert PythonTests(LIMITS)("p", sees_it, ADD_TESTS) == 0.0
    result = run_python("import os\nassert os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR']\n"
                        "assert 'ALIGNSERVE_TEST_CANARY' not in os.environ, os.environ\n", LIMITS)
    assert result.passed, result.output


def test_sandbox_outcomes_name_what_stopped_a_run() -> None:
    assert run_python("print('hi')\n", LIMITS).outcome == "passed"
    assert run_python("raise SystemExit(3)\n", LIMITS).outcome == "failed"
    assert run_python("while True: pass\n", SandboxLimits(time_s=1.0)).outcome == "timeout"
    flood = run_python("while True: print('y' * 1000)\n", LIMITS)
    assert flood.outcome == "output_limit" and len(flood.output) <= LIMITS.output_bytes


# Plug-ins.

def test_a_plugin_from_an_installed_entry_point_is_discovered(isolated: None, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    info = site / "alignserve_test_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: alignserve-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ntest-length-is = alignserve_test_plugin:length\n")
    (site / "alignserve_test_plugin.py").write_text(textwrap.dedent("""
        def length(prompt, completion, reference):
            return float(len(completion) == reference)

        length.needs_reference = True
    """))
    installed = {entry.name for entry in entry_points(group=ENTRY_POINT_GROUP)}
    monkeypatch.setattr(registry, "_VERIFIERS", {n: v for n, v in registry._VERIFIERS.items() if n not in installed})
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.syspath_prepend(str(site))

    verify = get_verifier("test-length-is")
    assert verify.needs_reference and verify.served
    assert verify("p", "abc", 3) == 1.0 and verify("p", "abc", 4) == 0.0
    scorers = ScorerCatalog.load(SimpleNamespace(names=lambda: []))
    assert "test-length-is" in scorers.names() and "test-length-is" in scorers.reference_names()


def test_a_module_function_verifier_is_for_the_command_line_only(isolated: None) -> None:
    verify = resolve_verifier("models.tasks.chat_arith:reward")
    assert verify.name == "models.tasks.chat_arith:reward" and verify(ARITH_PROMPT, "31") == 1.0
    assert resolve_verifier("demo-verifier") is get_verifier("demo-verifier")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_verifier("no_such_module:check")
    with pytest.raises(UnknownVerifierError):
        resolve_verifier("no-such-verifier")
    assert "models.tasks.chat_arith:reward" not in verifier_names()  # never registered, so never served


# search.reference in requests.

def reference_services(code_verifiers: bool = False) -> Services:
    scorers = ScorerCatalog.load(SimpleNamespace(names=lambda: []), code_verifiers=code_verifiers)
    settings = SimpleNamespace(max_search_candidates=8, max_block_tokens=16)
    return Services(settings=settings, engine=None, renderer=None, catalog=None, scorers=scorers, search=None,
                    lifecycle=None, cache=None, tools=None, created=0, tracker=None)


def test_a_verifier_that_needs_a_reference_is_refused_without_one() -> None:
    services = reference_services()
    spec = services.resolve_search({"type": "best_of_n", "n": 4, "scorer": "math", "reference": "\\frac{1}{2}"})
    assert spec.reference == "\\frac{1}{2}"
    assert services.resolve_search({"type": "best_of_n", "n": 4, "scorer": "exact",
                                    "reference": ["a", "b"]}).reference == ["a", "b"]
    assert services.resolve_search({"type": "best_of_n", "n": 4, "scorer": "demo-verifier"}).reference is None
    for scorer in ("math", "exact", "regex", "json-schema"):
        with pytest.raises(InvalidRequest) as info:
            services.resolve_search({"type": "blockwise", "candidates": 2, "block_tokens": 4, "scorer": scorer})
        assert info.value.param == "search.reference" and scorer in info.value.message
    with pytest.raises(GuidanceError) as caught:
        parse_search({"type": "best_of_n", "n": 2, "scorer": "v", "reference": None}, ["v"],
                      SearchLimits(8, 16), reference_scorers=["v"])
    assert caught.value.param == "search.reference"


@pytest.mark.parametrize("scorer", ["python-tests", "models.tasks.chat_arith:reward", "os:system"])
def test_requests_cannot_name_code_running_or_unregistered_verifiers(scorer: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        reference_services().resolve_search({"type": "best_of_n", "n": 2, "scorer": scorer, "reference": "x"})
    assert info.value.param == "search.scorer"


def test_an_operator_may_serve_code_running_verifiers_and_only_registered_ones() -> None:
    """--serve-code-verifiers: python-tests becomes a scorer (for a trusted deployment, e.g. an evaluation
    harness); an unregistered module:function never does."""
    services = reference_services(code_verifiers=True)
    spec = services.resolve_search({"type": "best_of_n", "n": 2, "scorer": "python-tests", "reference": "assert 1"})
    assert spec.scorer == "python-tests" and services.scorers["python-tests"].score(
        "p", [], [Completion("x = 1", ()), Completion("raise SystemExit(3)", ())], "assert x == 1") == [1.0, 0.0]
    with pytest.raises(InvalidRequest):
        services.resolve_search({"type": "best_of_n", "n": 2, "scorer": "os:system", "reference": "x"})


def test_math_reads_the_final_answer_for_majority_votes() -> None:
    read = answer_extractor("math")
    assert read("28 + 13 = 41\n\n41 + 25 = 66. So the answer is 66.") == "66"
    assert read("It is \\boxed{\\frac{2}{4}}") == read("1/2") == "1/2"  # one canonical form per value
    assert read("no number at all") is None
