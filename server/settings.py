"""Operator settings: one frozen pydantic-settings object, read once at start-up.

Values come from (highest priority first) CLI flags, environment variables
prefixed ``ALIGNSERVE_`` (e.g. ``ALIGNSERVE_PORT=9000``), then the defaults
below. Library code never reads the environment; it receives this object.
The vLLM engine arguments passed through (tensor_parallel_size, ...) are generated
from vLLM's own `AsyncEngineArgs` (server.engine_args).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, create_model, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from guidance.catalog import local_guide_paths, read_guide_table
from models.demo.build import demo_base_dir
from models.demo.paths import demo_guides_file
from server.engine_args import engine_fields

DEMO_MODEL_NAME = "demo-base"

# vLLM's engine arguments we pass through (server.engine_args), as settings fields.
EngineSettings = create_model("EngineSettings", __base__=BaseSettings, **engine_fields())  # type: ignore[call-overload]


class Settings(EngineSettings):  # type: ignore[valid-type,misc]
    model_config = SettingsConfigDict(env_prefix="ALIGNSERVE_", frozen=True, extra="forbid")

    model: Path = Field(
        default_factory=demo_base_dir,
        description="Base model directory (HF format: config.json, safetensors, tokenizer).",
    )
    served_model_name: str | None = Field(
        default=None,
        description="Model id clients use; defaults to 'demo-base' for the demo model, else the directory name.",
    )
    preload_tcmalloc: bool = Field(
        default=True,
        description="Restart once with tcmalloc in LD_PRELOAD when it is installed (Debian: libtcmalloc-minimal4) "
        "and LD_PRELOAD names no allocator: vLLM on CPU asks for it, and guided steps run up to 2x faster; "
        "the engine processes inherit it.",
    )
    host: str = Field(default="127.0.0.1", description="Interface to bind.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to bind (0 picks a free one).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weight and activation dtype of the base model; auto: vLLM's choice (the checkpoint's "
        "dtype) on a GPU and on a CPU with bfloat16 instructions (AVX512_BF16 or AMX), float32 on a CPU without "
        "them, where bfloat16 runs several times slower."
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="Context length (prompt + completion); default: the model's own."
    )
    kv_cache_space_gib: float = Field(
        default=1.0, gt=0, description="Memory reserved for vLLM's KV cache, in GiB."
    )
    guide_models: Path | None = Field(
        default=None,
        description="JSON file mapping guide-model names to directories (relative to the file), to "
        "{\"url\": ...} for a reward model served by URL, or to {\"path\": ..., \"kind\": \"reward_model\"|\"prm\"} "
        "for an off-the-shelf reward model (docs/guidance.md); "
        "default: the demo guide models when serving the demo model, else none.",
    )
    guide_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weight and activation dtype of the guide models (offsets and KL are computed "
        "in float32 either way); auto: the dtype the engine runs the base model in (--dtype).",
    )
    guide_kv_cache_space_gib: float | None = Field(
        default=None, gt=0, description="Memory for each guide model's KV cache, in GiB; requests that could "
        "overflow it wait with a 429 (docs/guidance.md). Default: every engine sequence at max_model_len.",
    )
    tool_call_parser: str | None = Field(
        default=None,
        description="vLLM tool parser that reads tool calls from the model's output (e.g. hermes, llama3_json, "
        "pythonic); needed for tool_choice 'required', a named tool, and 'auto'. Default: none.",
    )
    enable_auto_tool_choice: bool = Field(
        default=False, description="Let the model decide to call tools (tool_choice 'auto'); needs --tool-call-parser.",
    )
    max_n: int = Field(default=16, ge=1, description="Largest `n` a request may ask for.")
    max_tokens_limit: int | None = Field(
        default=None, ge=1, description="Largest max_tokens a request may ask for; default: the context length."
    )
    max_guidance_entries: int = Field(default=4, ge=1, description="Most guidance entries one request may list.")
    max_search_candidates: int = Field(
        default=16, ge=1, description="Largest best-of-N `n` and blockwise `candidates` a request may ask for."
    )
    max_block_tokens: int = Field(default=64, ge=1, description="Largest blockwise `block_tokens`.")
    api_keys: str | None = Field(
        default=None, description="Comma-separated API keys; when set, every path but /health, /ready, /version "
        "(and /metrics unless --auth-metrics) requires 'Authorization: Bearer <key>'. Default: none, no key needed."
    )
    auth_metrics: bool = Field(default=False, description="Require an API key for /metrics too.")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="Largest request body, in bytes (413 beyond).")
    max_waiting_requests: int = Field(
        default=512, ge=0, description="Most engine requests that may wait for a slot; 429 beyond."
    )
    cache: Literal["on", "off"] = Field(
        default="on", description="Cache responses of deterministic requests (temperature 0 or a seed)."
    )
    redis_url: str | None = Field(
        default=None, description="Redis URL (redis://host:6379/0) for a cache shared by replicas; default: in memory."
    )
    cache_ttl_s: int = Field(default=3600, ge=1, description="How long a cached response lives.")
    cache_max_entries: int = Field(default=4096, ge=1, description="Entries the in-memory cache keeps (LRU).")
    responses_store_max_entries: int = Field(
        default=1024, ge=0, description="Responses of /v1/responses kept for retrieval and previous_response_id "
        "(store: true): in this process's memory only (found on this replica, lost on restart), least recently used "
        "dropped first; 0 keeps none.",
    )
    cache_namespace: str = Field(default="alignserve", min_length=1, description="Prefix of cache keys in Redis.")
    redis_timeout_s: float = Field(default=0.05, gt=0, description="Timeout of one Redis command.")
    redis_cooldown_s: float = Field(
        default=1.0, ge=0, description="After a Redis failure, how long requests skip Redis (fail open)."
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After sent with 429.")
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="Deadline of a generation request, from admission to its last byte; a request "
        "may ask for another with `timeout_s`, up to --max-request-timeout-s. Past it: 503 deadline_exceeded.",
    )
    max_request_timeout_s: float = Field(
        default=3600.0, gt=0, description="Largest `timeout_s` a request may ask for (400 beyond).",
    )
    stall_timeout_s: float = Field(
        default=120.0, gt=0, description="A request that makes no progress this long while the engine holds none of "
        "its work is ended by the watchdog (503 request_stalled) and logged with where it was stuck.",
    )
    rpc_timeout_s: float = Field(
        default=30.0, gt=0, description="Timeout of a call to the engine's workers (a guided choice's KL report, "
        "guidance timings); past it the requests waiting on it get 503 engine_timeout.",
    )
    serve_code_verifiers: bool = Field(
        default=False, description="Let requests name the verifiers that run code their reference brings "
        "(python-tests) as search scorers. Only where every client is trusted: the sandbox bounds time, memory, "
        "output and files but is no security boundary (docs/guidance.md).",
    )
    scorer_timeout_s: float = Field(
        default=60.0, gt=0, description="Timeout of one scoring call of a search (best-of-N, blockwise, pruning); "
        "past it the request gets 503 scorer_timeout.",
    )
    debug_key: str | None = Field(
        default=None, description="Serve GET /debug/requests (in-flight requests by stage, and the server's asyncio "
        "tasks) to 'Authorization: Bearer <debug_key>'. Default: no debug route. SIGUSR1 logs the same dump.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _model_dir_exists(self) -> "Settings":
        if not (self.model / "config.json").is_file():
            raise ValueError(f"model: {self.model} is not a model directory (no config.json)")
        return self

    @model_validator(mode="after")
    def _timeouts_consistent(self) -> "Settings":
        if self.request_timeout_s > self.max_request_timeout_s:
            raise ValueError(f"request_timeout_s ({self.request_timeout_s:g}) is over max_request_timeout_s "
                             f"({self.max_request_timeout_s:g})")
        return self

    @model_validator(mode="after")
    def _tool_parser_known(self) -> "Settings":
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs tool_call_parser (which parser reads the tool calls)")
        if self.tool_call_parser is not None:
            from vllm.tool_parsers import ToolParserManager  # vLLM's registry; loaded only when asked for

            known = ToolParserManager.list_registered()
            if self.tool_call_parser not in known:
                raise ValueError(f"tool_call_parser: {self.tool_call_parser!r} is not one of vLLM's tool parsers "
                                 f"({', '.join(known)})")
        return self

    def guide_table_file(self) -> Path | None:
        """--guide-models, or the demo guide models' table when serving the demo model."""
        if self.guide_models is None and self.model.resolve() == demo_base_dir().resolve() \
                and demo_guides_file().is_file():
            return demo_guides_file()
        return self.guide_models

    def guide_table(self) -> dict[str, str | dict]:
        """The operator's guide-model table as written: {name: directory}, {name: {"url": ...}} or
        {name: {"path": ..., "kind": ...}}."""
        table_file = self.guide_table_file()
        return {} if table_file is None else read_guide_table(table_file)

    def guide_model_paths(self) -> dict[str, Path]:
        """The guide models of the operator's table, {name: directory}."""
        table_file = self.guide_table_file()
        return {} if table_file is None else local_guide_paths(table_file)

    def remote_scorer_entries(self) -> dict[str, dict]:
        """The scorers served by URL in the operator's table, {name: entry} (guidance.search.remote)."""
        return {name: entry for name, entry in self.guide_table().items()
                if isinstance(entry, dict) and "url" in entry}

    def scorer_model_entries(self) -> dict[str, dict]:
        """The other object entries, off-the-shelf reward models ({"path": ..., "kind": ...},
        guidance.search.hf_entries), their path made absolute (relative to the table's file)."""
        table_file = self.guide_table_file()
        return {name: {**entry, "path": str((table_file.parent / entry["path"]).resolve())}
                if isinstance(entry.get("path"), str) and entry["path"] else entry
                for name, entry in self.guide_table().items() if isinstance(entry, dict) and "url" not in entry}

    @property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in (self.api_keys or "").split(",") if key.strip()]

    @property
    def model_name(self) -> str:
        """The id served at /v1/models and expected in each request's `model` field."""
        if self.served_model_name:
            return self.served_model_name
        if self.model.resolve() == demo_base_dir().resolve():
            return DEMO_MODEL_NAME
        return self.model.resolve().name
