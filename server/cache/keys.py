"""Cache keys: a hash of everything that determines a deterministic response.

The key covers the base model's identity and revision, the revision of every guide
model and scorer model the request uses, every output-affecting request field (all of them but
`stream`, `stream_options`, `user`, `cache` and `timeout_s`; `request_id` is not in a request's dump), the guidance
spec as resolved, and
the prompt or messages. Two requests that can differ in output never share a key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CACHE_FORMAT = 1
NOT_OUTPUT_AFFECTING = frozenset({"stream", "stream_options", "user", "cache", "timeout_s"})
_SAMPLE_BYTES = 1 << 20


def model_revision(path: Path) -> str:
    """A fingerprint of a model directory: its JSON configs in full, and each weight file's
    size and first MiB (which holds the safetensors header). Cheap even for large models."""
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if not file.is_file():
            continue
        digest.update(file.name.encode())
        if file.suffix == ".json" or file.suffix == ".jinja":
            digest.update(file.read_bytes())
        elif file.suffix == ".safetensors":
            digest.update(str(file.stat().st_size).encode())
            with file.open("rb") as handle:
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def cache_key(namespace: str, identity: dict[str, Any], endpoint: str, request: dict[str, Any]) -> str:
    """`namespace:v<format>:<sha256>` of the canonical JSON of what determines the output."""
    material = {
        "format": CACHE_FORMAT,
        "identity": identity,
        "endpoint": endpoint,
        "request": {k: v for k, v in request.items() if k not in NOT_OUTPUT_AFFECTING},
    }
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{namespace}:v{CACHE_FORMAT}:{hashlib.sha256(canonical.encode()).hexdigest()}"
