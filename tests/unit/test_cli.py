"""The `alignserve` command line and its settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models.demo.build import demo_base_dir
from server.cli import build_parser
from server.settings import Settings

ALIGNSERVE = Path(sys.executable).parent / "alignserve"


def test_every_setting_has_a_serve_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in help_text
        assert f"ALIGNSERVE_{name.upper()}" in help_text


def test_console_script_help():
    for args in ([], ["serve"], ["demo", "build"], ["demo", "guides"], ["demo", "eval"]):
        result = subprocess.run([str(ALIGNSERVE), *args, "--help"], capture_output=True, text=True, check=True)
        assert "usage: alignserve" in result.stdout


def test_invalid_setting_exits_2_naming_it():
    result = subprocess.run([str(ALIGNSERVE), "serve", "--model", "/nonexistent"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "model" in result.stderr and "/nonexistent" in result.stderr


def test_defaults_serve_the_demo_model(monkeypatch):
    settings = Settings()
    assert settings.model == demo_base_dir()
    assert settings.model_name == "demo-base"
    assert settings.port == 8000


def test_environment_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNSERVE_PORT", "9123")
    monkeypatch.setenv("ALIGNSERVE_MAX_N", "4")
    assert (Settings().port, Settings().max_n) == (9123, 4)
    assert Settings(port=9200).port == 9200
    (tmp_path / "config.json").write_text("{}")
    assert Settings(model=tmp_path).model_name == tmp_path.name
    assert Settings(model=tmp_path, served_model_name="x").model_name == "x"
    with pytest.raises(ValueError):
        Settings(port=70000)
    frozen = Settings()
    with pytest.raises(ValueError):
        frozen.port = 1


def test_serve_help_gives_each_flags_real_default_and_bools_are_switches():
    parser = build_parser()._subparsers._group_actions[0].choices["serve"]
    actions = {action.dest: action for action in parser._actions}
    for name, field in Settings.model_fields.items():
        action = actions[name]
        assert "model's own" not in action.help or name == "max_model_len", name
        if field.annotation is bool:
            assert action.nargs == 0 and f"default: {str(field.default).lower()}" in action.help, name
        elif field.default is not None and not field.default_factory:
            assert f"default: {field.default}]" in action.help, name
    args = parser.parse_args(["--auth-metrics", "--no-enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    assert (args.auth_metrics, args.enable_auto_tool_choice, args.tool_call_parser) == (True, False, "hermes")
    assert parser.parse_args([]).auth_metrics is None  # unset: the environment or the default applies


def test_tool_parser_settings_are_checked():
    with pytest.raises(ValueError, match="needs tool_call_parser"):
        Settings(enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="not one of vLLM's tool parsers"):
        Settings(tool_call_parser="no-such-parser")
    assert Settings(tool_call_parser="hermes", enable_auto_tool_choice=True).tool_call_parser == "hermes"
