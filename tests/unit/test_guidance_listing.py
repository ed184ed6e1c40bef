"""GET /v1/guidance's parameter schemas: self-contained (no $ref), with the required fields."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from guidance.catalog import GuideCatalog
from server.api.guidance import list_guidance


def listing() -> dict:
    services = SimpleNamespace(catalog=GuideCatalog({}), scorers=SimpleNamespace(names=lambda: []),
                               settings=SimpleNamespace(max_search_candidates=16, max_block_tokens=64,
                                                        max_guidance_entries=4))
    return asyncio.run(list_guidance(services))


def test_every_parameter_schema_is_self_contained_and_names_its_required_fields():
    result = listing()
    for entry in (*result["modules"], *result["search"]["types"]):
        assert "$ref" not in json.dumps(entry["parameters"]), entry["type"]
        assert set(entry["required"]) <= set(entry["parameters"]), entry["type"]
    qsharp = next(m for m in result["modules"] if m["type"] == "qsharp")
    assert qsharp["required"] == ["type", "model", "strength"]
    assert qsharp["parameters"]["strength"]["minimum"] == 0.0


def test_best_of_n_prune_is_listed_with_its_fields():
    best_of_n = next(t for t in listing()["search"]["types"] if t["type"] == "best_of_n")
    assert best_of_n["required"] == ["type", "scorer", "n"]
    prune = best_of_n["parameters"]["prune"]
    assert prune["default"] is None and prune["description"].startswith("Abort the weakest")
    schema = next(option for option in prune["anyOf"] if option.get("type") == "object")
    assert list(schema["properties"]) == ["scorer", "every", "fraction", "min_keep"]
    assert schema["required"] == ["scorer", "every", "fraction"]
    assert schema["properties"]["fraction"]["exclusiveMaximum"] == 1.0
