"""vLLM adapter: the only module that imports vLLM's logits-processor API.

`GuidanceLogitsProcessor` is registered at engine construction
(``logits_processors=[GuidanceLogitsProcessor]``). It is built inside vLLM's
worker process, loads the operator's guide models named in
``additional_config["alignserve"]``, follows the persistent batch through
`BatchUpdate`s and steers the rows whose ``SamplingParams.extra_args`` carry
guidance. vLLM samples on every tensor-parallel rank of the last pipeline stage, each
from the full logits, so the guide models are loaded there (once per such rank) and
nowhere else (docs/guidance.md, "Under tensor and pipeline parallelism").
`GuidanceWorkerExtension` adds a collective-RPC method through which the server
collects each request's KL report.

Request extra_args: ``{"guidance": [entry, ...], "guidance_key": "<unique id>"}``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm import SamplingParams
from vllm.distributed import get_pp_group
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from guidance.batch import GuidanceBatch, GuidanceReport
from guidance.catalog import GuideCatalog
from guidance.errors import GuidanceError
from guidance.kv_budget import guide_kv_capacity, guide_kv_plans
from guidance.loading import load_guide_models
from guidance.spec import parse_guidance

logger = logging.getLogger(__name__)

# in VllmConfig.additional_config: {"guide_models": {name: path}, "guide_dtype": ..., "guide_kv_cache_space_gib": ...}
CONFIG_KEY = "alignserve"
GUIDANCE_ARG = "guidance"
KEY_ARG = "guidance_key"
REPORTS_RPC = "alignserve_guidance_reports"
TIMINGS_RPC = "alignserve_guidance_timings"

# The worker's batch, for the report RPC (one processor per worker process).
_worker_batch: GuidanceBatch | None = None


def engine_config(catalog: GuideCatalog, guide_dtype: str = "auto",
                  guide_kv_cache_space_gib: float | None = None) -> dict[str, Any]:
    """The `additional_config` entry that hands the guide-model table, their dtype and their KV
    budget to the worker."""
    return {CONFIG_KEY: {"guide_models": catalog.paths(), "guide_dtype": guide_dtype,
                         "guide_kv_cache_space_gib": guide_kv_cache_space_gib}}


def resolve_guide_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The guide models' dtype: `name`, or for "auto" the dtype the engine runs the base model in
    (`model_dtype`; vLLM's own "auto": bfloat16 on a GPU, and on a CPU with bfloat16 instructions,
    where matrix products run several times faster than in float32)."""
    return model_dtype if name == "auto" else getattr(torch, name)


class GuidanceLogitsProcessor(LogitsProcessor):
    # Set by the server in its own process so `validate_params` (which vLLM runs there, per
    # request, without the engine config) can check model names as well as shapes.
    catalog: GuideCatalog | None = None

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        args = sampling_params.extra_args or {}
        if GUIDANCE_ARG not in args:
            return
        if not isinstance(args.get(KEY_ARG), str):
            raise ValueError(f"extra_args.{KEY_ARG} must be a string unique to the request")
        catalog = cls.catalog if cls.catalog is not None else GuideCatalog({})
        try:
            parse_guidance(args[GUIDANCE_ARG], catalog, check_models=cls.catalog is not None)
        except GuidanceError as exc:
            raise ValueError(f"{exc.param}: {exc.message}") from exc

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        global _worker_batch
        config = (vllm_config.additional_config or {}).get(CONFIG_KEY, {})
        table = config.get("guide_models", {})
        self._catalog = GuideCatalog.from_paths(table)
        self._batch: GuidanceBatch | None = None
        if not get_pp_group().is_last_rank:
            # vLLM builds logits processors on every worker, but only the last pipeline stage samples.
            logger.info("guidance: pipeline stage %d does not sample; no guide models loaded",
                        get_pp_group().rank_in_group)
            return
        dtype = resolve_guide_dtype(config.get("guide_dtype", "auto"), vllm_config.model_config.dtype)
        models = load_guide_models(self._catalog, dtype=dtype, device=device)
        self._batch = GuidanceBatch(
            models, self._catalog,
            max_requests=vllm_config.scheduler_config.max_num_seqs,
            max_len=vllm_config.model_config.max_model_len,
            device=device,
            kv_blocks=guide_kv_capacity(guide_kv_plans(
                self._catalog, dtype, config.get("guide_kv_cache_space_gib"), vllm_config.scheduler_config.max_num_seqs,
                vllm_config.model_config.max_model_len)),
        )
        _worker_batch = self._batch
        logger.info("guidance: loaded guide models %s (%s)", self._catalog.names(), dtype)

    def is_argmax_invariant(self) -> bool:
        return False  # offsets change which token is most likely

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None or self._batch is None:
            return
        for row in batch_update.removed:
            self._batch.remove(row)
        for row, params, prompt_ids, output_ids in batch_update.added:
            args = params.extra_args or {}
            guidance = self._request_guidance(args) if prompt_ids is not None else []
            if guidance:
                # The KL report is measured at the request's sampling temperature (vLLM divides
                # the logits by it after this processor runs); greedy requests at temperature 1.
                self._batch.add(row, args[KEY_ARG], guidance, prompt_ids, output_ids,
                                temperature=params.temperature)
            else:
                self._batch.remove(row)
        for source, target, direction in batch_update.moved:
            self._batch.move(source, target, swap=direction == MoveDirectionality.SWAP)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        assert self._batch is not None, "vLLM samples on the last pipeline stage only"
        return self._batch.apply(logits)

    def _request_guidance(self, args: dict[str, Any]) -> list:
        if GUIDANCE_ARG not in args:
            return []
        try:
            return parse_guidance(args[GUIDANCE_ARG], self._catalog)
        except GuidanceError as exc:
            # validate_params admits only valid specs; this guards the engine loop regardless.
            logger.error("guidance ignored for request %s: %s", args.get(KEY_ARG), exc.message)
            return []


class GuidanceWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``) for collective RPCs."""

    def alignserve_guidance_reports(self, keys: list[str]) -> dict[str, tuple[float, int, tuple | None]]:
        """(KL, steered steps, the strength scale's (mean, min, max) or None without a KL budget) per key."""
        if _worker_batch is None:
            return {}
        reports: dict[str, GuidanceReport] = _worker_batch.collect(keys)
        return {key: (r.kl, r.steps, r.scale) for key, r in reports.items()}

    def alignserve_guidance_timings(self) -> dict | None:
        """`StepTimings` as a plain dict (RPC results cross processes as msgpack)."""
        return None if _worker_batch is None else vars(_worker_batch.timings)


WORKER_EXTENSION = f"{GuidanceWorkerExtension.__module__}.{GuidanceWorkerExtension.__qualname__}"
