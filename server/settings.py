"""Operator settings: one frozen pydantic-settings object, read once at start-up.

Values come from (highest priority first) CLI flags, environment variables
prefixed ``ALIGNSERVE_`` (e.g. ``ALIGNSERVE_PORT=9000``), then the defaults
below. Library code never reads the environment; it receives this object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.demo.build import demo_base_dir
from models.demo.paths import demo_guides_file

DEMO_MODEL_NAME = "demo-base"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIGNSERVE_", frozen=True, extra="forbid")

    model: Path = Field(
        default_factory=demo_base_dir,
        description="Base model directory (HF format: config.json, safetensors, tokenizer).",
    )
    served_model_name: str | None = Field(
        default=None,
        description="Model id clients use; defaults to 'demo-base' for the demo model, else the directory name.",
    )
    host: str = Field(default="127.0.0.1", description="Interface to bind.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to bind (0 picks a free one).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weight and activation dtype of the base model."
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="Context length (prompt + completion); default: the model's own."
    )
    kv_cache_space_gib: float = Field(
        default=1.0, gt=0, description="Memory reserved for vLLM's KV cache, in GiB."
    )
    max_num_seqs: int | None = Field(
        default=None, ge=1, description="Most sequences the engine batches per step; default: vLLM's."
    )
    guide_models: Path | None = Field(
        default=None,
        description="JSON file mapping guide-model names to directories (relative to the file); "
        "default: the demo guide models when serving the demo model, else none.",
    )
    max_n: int = Field(default=16, ge=1, description="Largest `n` a request may ask for.")
    max_guidance_entries: int = Field(default=4, ge=1, description="Most guidance entries one request may list.")
    seed: int = Field(default=0, description="Engine seed (requests without a seed still sample freshly).")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _model_dir_exists(self) -> "Settings":
        if not (self.model / "config.json").is_file():
            raise ValueError(f"model: {self.model} is not a model directory (no config.json)")
        return self

    def guide_model_paths(self) -> dict[str, Path]:
        """The operator's guide-model table, {name: directory}."""
        table_file = self.guide_models
        if table_file is None and self.model.resolve() == demo_base_dir().resolve() and demo_guides_file().is_file():
            table_file = demo_guides_file()
        if table_file is None:
            return {}
        table = json.loads(table_file.read_text())
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise ValueError(f"guide_models: {table_file} must hold a JSON object of name -> directory")
        return {name: (table_file.parent / path).resolve() for name, path in table.items()}

    @property
    def model_name(self) -> str:
        """The id served at /v1/models and expected in each request's `model` field."""
        if self.served_model_name:
            return self.served_model_name
        if self.model.resolve() == demo_base_dir().resolve():
            return DEMO_MODEL_NAME
        return self.model.resolve().name
