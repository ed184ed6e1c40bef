"""The `alignserve` command line and its settings."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from guidance.catalog import GuideCatalog
from models.demo.build import demo_base_dir
from server.cli import build_parser
from server.engine import EngineSettingsError, engine_args, engine_config
from server.engine_args import ENGINE_ARGS, OUR_DEFAULTS
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


# Engine arguments passed through to vLLM (server.engine_args): a non-default value for each.
ENGINE_FLAGS = {
    "tensor_parallel_size": ("2", 2),
    "pipeline_parallel_size": ("2", 2),
    "data_parallel_size": ("2", 2),
    "distributed_executor_backend": ("ray", "ray"),
    "gpu_memory_utilization": ("0.5", 0.5),
    "quantization": ("fp8", "fp8"),
    "enable_prefix_caching": (None, True),
    "max_num_batched_tokens": ("4096", 4096),
    "kv_cache_dtype": ("fp8", "fp8"),
    "max_num_seqs": ("8", 8),
    "seed": ("7", 7),
    "trust_remote_code": (None, True),
    "revision": ("v2", "v2"),
    "tokenizer": ("/tokenizers/t", "/tokenizers/t"),
    "enforce_eager": (None, True),
    "logprobs_mode": ("processed_logprobs", "processed_logprobs"),
}


def serve_parser():
    return build_parser()._subparsers._group_actions[0].choices["serve"]


def test_engine_table_is_vllms_own():
    from vllm.engine.arg_utils import AsyncEngineArgs

    vllm_fields = {f.name: f for f in dataclasses.fields(AsyncEngineArgs)}
    assert set(ENGINE_ARGS) == set(ENGINE_FLAGS)
    for name in ENGINE_ARGS:
        field = Settings.model_fields[name]
        assert field.description.startswith("vLLM engine argument:"), name
        if name not in OUR_DEFAULTS:
            assert field.default == vllm_fields[name].default, name
    assert Settings.model_fields["enforce_eager"].default is False  # vLLM's own: it decides per platform


def test_each_engine_flag_reaches_async_engine_args(monkeypatch):
    monkeypatch.setattr("server.engine.torch.cuda.is_available", lambda: True)  # pipeline parallelism: GPUs only
    argv = []
    for name, (value, _) in ENGINE_FLAGS.items():
        argv += [f"--{name.replace('_', '-')}"] + ([] if value is None else [value])
    args = serve_parser().parse_args(argv)
    overrides = {name: getattr(args, name) for name in ENGINE_ARGS}
    engine = engine_args(Settings(**overrides), GuideCatalog({}))
    for name, (_, expected) in ENGINE_FLAGS.items():
        assert getattr(engine, name) == expected, name


def test_engine_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("ALIGNSERVE_TENSOR_PARALLEL_SIZE", "2")
    monkeypatch.setenv("ALIGNSERVE_ENABLE_PREFIX_CACHING", "false")
    monkeypatch.setenv("ALIGNSERVE_DISTRIBUTED_EXECUTOR_BACKEND", "mp")
    engine = engine_args(Settings(), GuideCatalog({}))
    assert (engine.tensor_parallel_size, engine.enable_prefix_caching, engine.distributed_executor_backend) == (
        2, False, "mp")
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        Settings(distributed_executor_backend="threads")


def test_combination_vllm_rejects_names_the_settings():
    with pytest.raises(EngineSettingsError, match=r"(?s)tensor_parallel_size=3.*divisible by tensor parallel"):
        engine_config(engine_args(Settings(tensor_parallel_size=3), GuideCatalog({})))
    with pytest.raises(EngineSettingsError, match=r"(?s)max_num_batched_tokens=8.*smaller than max_model_len"):
        engine_config(engine_args(Settings(max_num_batched_tokens=8), GuideCatalog({})))
    config = engine_config(engine_args(Settings(tensor_parallel_size=2), GuideCatalog({})))
    assert config.parallel_config.world_size == 2


def test_pipeline_parallelism_is_refused_on_cpu():
    with pytest.raises(EngineSettingsError, match=r"pipeline_parallel_size=2 on CPU.*KeyError on the request id"):
        engine_args(Settings(pipeline_parallel_size=2), GuideCatalog({}))


def test_guidance_refuses_data_parallel_engines():
    catalog = GuideCatalog.from_paths(Settings().guide_model_paths())
    with pytest.raises(EngineSettingsError, match="data_parallel_size > 1 with guide models"):
        engine_args(Settings(data_parallel_size=2), catalog)


def test_rejected_engine_settings_exit_2_before_any_engine_starts():
    result = subprocess.run([str(ALIGNSERVE), "serve", "--tensor-parallel-size", "3", "--port", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "vLLM rejects the engine settings (tensor_parallel_size=3" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("entry, message", [
    ('{"url": "http://rm:8000", "retries": 99}', "rm.retries: Input should be less than or equal to 10"),
    ('{"kind": "prm", "step_tag": "x"}', "rm.path: Field required"),
])
def test_an_invalid_scorer_entry_exits_2_naming_the_field(tmp_path, entry, message):
    table = tmp_path / "guides.json"
    table.write_text(f'{{"rm": {entry}}}')
    result = subprocess.run([str(ALIGNSERVE), "serve", "--guide-models", str(table), "--port", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"invalid guide_models: {message}" in result.stderr
    assert "Traceback" not in result.stderr
