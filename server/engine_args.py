"""vLLM engine arguments that `serve` passes through, generated from vLLM's own `AsyncEngineArgs`.

`ENGINE_ARGS` is the one table: a field's type and default come from the `AsyncEngineArgs`
dataclass, its description from the docstring of the vLLM config class that holds it. Where we
default differently, `OUR_DEFAULTS` says so and why. `Settings` gets one field per name, and so
one `serve` flag and one ALIGNSERVE_* variable.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from pydantic import Field
from pydantic.fields import FieldInfo
from vllm.config import CacheConfig, LoadConfig, ModelConfig, ParallelConfig, SchedulerConfig
from vllm.config.utils import get_attr_docs
from vllm.engine.arg_utils import AsyncEngineArgs

ENGINE_ARGS: tuple[str, ...] = (
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "data_parallel_size",
    "distributed_executor_backend",
    "gpu_memory_utilization",
    "quantization",
    "enable_prefix_caching",
    "max_num_batched_tokens",
    "kv_cache_dtype",
    "max_num_seqs",
    "seed",
    "trust_remote_code",
    "revision",
    "tokenizer",
    "enforce_eager",
    "logprobs_mode",
)

# Each guide model keeps a KV-cache slot per running sequence, so we start lower than vLLM (256 on GPU).
OUR_DEFAULTS: dict[str, Any] = {"max_num_seqs": 64}

_CONFIG_CLASSES = (ParallelConfig, CacheConfig, ModelConfig, SchedulerConfig, LoadConfig)


def _docs() -> dict[str, str]:
    docs: dict[str, str] = {}
    for config_class in _CONFIG_CLASSES:
        for name, doc in get_attr_docs(config_class).items():
            docs.setdefault(name, doc.split("\n\n")[0].replace("\n", " "))
    return docs


def _settings_type(annotation: Any) -> Any:
    """The dataclass field's type, with members a flag cannot carry (classes, a bare `str` that a
    Literal of the same union narrows) left out."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return annotation
    members = [m for m in typing.get_args(annotation) if typing.get_origin(m) is not type]
    if any(typing.get_origin(m) is Literal for m in members):
        members = [m for m in members if m is not str]
    return typing.Union[tuple(members)] if len(members) > 1 else members[0]


def engine_fields() -> dict[str, tuple[Any, FieldInfo]]:
    """{name: (type, pydantic Field)} for each name in `ENGINE_ARGS`."""
    dataclass_fields = {f.name: f for f in dataclasses.fields(AsyncEngineArgs)}
    docs = _docs()
    fields: dict[str, tuple[Any, FieldInfo]] = {}
    for name in ENGINE_ARGS:
        field = dataclass_fields[name]
        default = OUR_DEFAULTS.get(name, field.default)
        if default is dataclasses.MISSING:
            default = field.default_factory()  # type: ignore[misc]
        description = f"vLLM engine argument: {docs.get(name, name)}"
        if default is None:
            description += " Default: vLLM's choice for the model and platform."
        fields[name] = (_settings_type(field.type), Field(default=default, description=description))
    return fields
