"""`alignserve eval` refuses bad input before any request, naming the flag or field; server start and stop."""

from __future__ import annotations

import json
import sys
import textwrap

import httpx
import pytest

from server.cli import build_parser, main
from workflows.eval_cli import _configs
from workflows.server_process import start_server


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "1+2="}) + "\n")
    return path


def run(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(["eval", *argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def test_bad_input_is_refused_naming_the_flag(capsys, prompts, tmp_path):
    common = ["--prompts", str(prompts), "--out", str(tmp_path / "out"), "--url", "http://127.0.0.1:9"]
    cases = [
        (["--verifier", "nope"], "Unknown verifier 'nope'"),
        (["--verifier", "demo-verifier", "--strengths", "1,x"], "argument --strengths: 'x' is not a number"),
        (["--verifier", "demo-verifier", "--n", "0"], "argument --n: 0 must be at least 1"),
        (["--verifier", "demo-verifier", "--qsharp", "v@-1"], "argument --qsharp: strength -1 must be >= 0"),
        (["--verifier", "demo-verifier", "--top-p", "0"], "argument --top-p: must be in (0, 1]"),
        (["--verifier", "demo-verifier", "--samples", "0"], "argument --samples: must be at least 1"),
        (["--verifier", "demo-verifier", "--guide-models", "g.json"], "--guide-models and --serve-args need --model"),
        (["--verifier", "demo-verifier", "--qsharp", "v@1", "v@1"], "'qsharp(v)@1' is used twice"),
        (["--verifier", "demo-verifier", "--configs", str(tmp_path / "missing.json")], "--configs"),
        (["--verifier", "demo-verifier", "--prune", "v"], "--prune prunes best-of-N: give --best-of-n"),
        (["--verifier", "demo-verifier", "--prune-fraction", "1"], "argument --prune-fraction: must be in (0, 1)"),
        (["--verifier", "demo-verifier", "--min-entropy", "-1"], "argument --min-entropy: strength -1 must be >= 0"),
        (["--verifier", "demo-verifier", "--qsharp", "v", "--kl-budgets", "0.5,x"],
         "argument --kl-budgets: 'x' is not a number"),
        (["--verifier", "demo-verifier", "--qsharp", "v", "--kl-budgets", "0"],
         "argument --kl-budgets: budget 0 must be a finite number > 0"),
        (["--verifier", "demo-verifier", "--qsharp", "v", "--kl-budgets", "1,1"],
         "argument --kl-budgets: budget 1 is given twice"),
        (["--verifier", "demo-verifier", "--best-of-n", "demo-verifier", "--kl-budgets", "1"],
         "--kl-budgets budgets per-step guidance: give --qsharp, --cd, --arm, --genarm or --contrast"),
    ]
    for flags, message in cases:
        code, err = run(capsys, *common, *flags)
        assert code == 2 and message in err, (flags, err)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    code, err = run(capsys, "--prompts", str(bad), "--out", str(tmp_path / "out"), "--url", "http://127.0.0.1:9",
                    "--verifier", "demo-verifier")
    assert code == 2 and "--prompts" in err and "line 1" in err
    code, err = run(capsys, "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--verifier", "demo-verifier")
    assert code == 2 and "one of the arguments --model --url is required" in err
    for verifier, message in (("math", "prompt '1' (record 1) has no 'answer'; the verifier 'math' compares"),
                              ("no_such_module:check", "verifier 'no_such_module:check': cannot import it")):
        code, err = run(capsys, *common, "--verifier", verifier)
        assert code == 2 and message in err, (verifier, err)


def test_kl_budgets_budget_the_flags_guide_models_and_the_config_files_guidance(prompts, tmp_path):
    listed = tmp_path / "configs.json"
    listed.write_text(json.dumps([
        {"name": "mix", "method": "q+cd", "strength": 2,
         "guidance": [{"type": "qsharp", "model": "v", "strength": 2}, {"type": "cd", "model": "p", "strength": 1}]},
        {"name": "bo2", "method": "bo", "strength": 2, "search": {"type": "best_of_n", "n": 2, "scorer": "v"}}]))
    args = build_parser().parse_args(
        ["eval", "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--url", "http://x", "--verifier",
         "demo-verifier", "--arm", "a", "--configs", str(listed), "--kl-budgets", "0.5,1"])
    configs = _configs(args)
    assert [(c.name, c.kl_budget) for c in configs] == [
        ("base", None), ("arm(a) max_kl=0.5", 0.5), ("arm(a) max_kl=1", 1.0), ("mix", None), ("bo2", None),
        ("mix max_kl=0.5", 0.5), ("mix max_kl=1", 1.0)]
    assert configs[-1].guidance[1] == {"type": "cd", "model": "p", "strength": 1, "max_kl": 1.0}


def test_an_unreachable_server_is_an_error(capsys, prompts, tmp_path):
    code, err = run(capsys, "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--url",
                    "http://127.0.0.1:9", "--verifier", "demo-verifier")
    assert code == 1 and "could not read the served model's name" in err


HEALTHY = textwrap.dedent("""
    import http.server, sys
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
""")


def test_start_server_waits_for_health_and_stops(tmp_path):
    with start_server("fake", lambda port: [sys.executable, "-c", HEALTHY, str(port)], tmp_path / "s.log",
                      timeout_s=60) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert server.start_seconds > 0
    assert server.process.poll() is not None


def test_start_server_quotes_the_log_of_a_server_that_exits(tmp_path):
    script = "import sys; print('cannot load the model'); sys.exit(3)"
    with pytest.raises(RuntimeError, match=r"(?s)fake exited with 3.*cannot load the model"):
        start_server("fake", lambda port: [sys.executable, "-c", script], tmp_path / "s.log", timeout_s=60)
