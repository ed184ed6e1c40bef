"""Guidance specs: validation naming the field, the module registry and its entry points."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from guidance import registry
from guidance.catalog import GuideCatalog, GuideModelInfo, read_guide_info
from guidance.errors import GuidanceError
from guidance.module import GuidanceModule
from guidance.spec import parse_guidance

CATALOG = GuideCatalog({
    "value": GuideModelInfo("value", Path("/v"), "bernoulli", "q", 100),
    "hist": GuideModelInfo("hist", Path("/h"), "histogram", "v", 100, atoms=(0.0, 1.0)),
    "prefix": GuideModelInfo("prefix", Path("/p"), "expected", "v", 100),
    "arm": GuideModelInfo("arm", Path("/a"), "arm", "q", 100),
    "rlm": GuideModelInfo("rlm", Path("/r"), "lm", "q", 100),
})


def error_of(entries) -> GuidanceError:
    with pytest.raises(GuidanceError) as info:
        parse_guidance(entries, CATALOG, max_entries=4)
    return info.value


def test_valid_entries_resolve_defaults():
    resolved = parse_guidance([
        {"type": "qsharp", "model": "value", "strength": 4.0},
        {"type": "cd", "model": "prefix", "strength": 2.0, "top_k": 5},
        {"type": "arm", "model": "arm", "strength": 1.0},
        {"type": "genarm", "model": "rlm", "strength": 0.5, "top_k": -1},
    ], CATALOG)
    assert [(r.module.name, r.top_k) for r in resolved] == [("qsharp", 20), ("cd", 5), ("arm", -1), ("genarm", -1)]
    assert resolved[0].describe() == {"type": "qsharp", "model": "value", "strength": 4.0, "top_k": 20,
                                      "min_entropy": 0.0}


@pytest.mark.parametrize(
    ("entries", "param", "words"),
    [
        ([{"type": "nope", "model": "value", "strength": 1}], "guidance[0].type", "qsharp"),
        ([{"model": "value", "strength": 1}], "guidance[0].type", "Missing"),
        ([{"type": "qsharp", "model": "missing", "strength": 1}], "guidance[0].model", "value"),
        ([{"type": "qsharp", "model": "value", "strength": -1}], "guidance[0].strength", "greater than or equal"),
        ([{"type": "qsharp", "model": "value"}], "guidance[0].strength", "Missing"),
        ([{"type": "qsharp", "model": "value", "strength": 1, "eta": 2}], "guidance[0].eta", "Unrecognized"),
        ([{"type": "qsharp", "model": "value", "strength": 1, "top_k": 0}], "guidance[0].top_k", "top_k"),
        ([{"type": "qsharp", "model": "value", "strength": 1, "min_entropy": -0.5}], "guidance[0].min_entropy",
         "greater than or equal to 0"),
        ([{"type": "qsharp", "model": "value", "strength": 1, "min_entropy": float("nan")}],
         "guidance[0].min_entropy", "finite"),
        ([{"type": "cd", "model": "prefix", "strength": 1, "min_entropy": "high"}], "guidance[0].min_entropy",
         "number"),
        ([{"type": "cd", "model": "value", "strength": 1}, {"type": "qsharp", "model": "prefix", "strength": 1}],
         "guidance[1].model", "expected"),
        ([{"type": "cd", "model": "prefix", "strength": 1, "top_k": -1}], "guidance[0].top_k", "top_k"),
        ([{"type": "arm", "model": "value", "strength": 1}], "guidance[0].model", "arm"),
        (["qsharp"], "guidance[0]", "object"),
        ({"type": "qsharp"}, "guidance", "list"),
        ([{"type": "arm", "model": "arm", "strength": 1}] * 5, "guidance", "at most 4"),
    ],
)
def test_invalid_entries_name_the_field(entries, param, words):
    error = error_of(entries)
    assert error.param == param
    assert words in error.message


def test_structural_check_without_catalog():
    parse_guidance([{"type": "qsharp", "model": "anything", "strength": 1}], GuideCatalog({}), check_models=False)
    with pytest.raises(GuidanceError):
        parse_guidance([{"type": "qsharp", "model": "x", "strength": -1}], GuideCatalog({}), check_models=False)


def test_unknown_module_lists_known():
    with pytest.raises(KeyError) as info:
        registry.get_module("nope")
    assert "qsharp" in str(info.value) and "genarm" in str(info.value)


class Shift(GuidanceModule):
    name = "shift"
    head_types = ("expected",)

    def offsets(self, scores, strength, head_type, atoms):
        return strength * scores


def test_entry_point_modules_are_registered(monkeypatch):
    point = EntryPoint(name="shift", value=f"{__name__}:Shift", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [point] if group == registry.ENTRY_POINT_GROUP else [])
    registry.available_modules.cache_clear()
    try:
        assert isinstance(registry.get_module("shift"), Shift)
        assert parse_guidance([{"type": "shift", "model": "prefix", "strength": 1, "top_k": 3}], CATALOG)[0].top_k == 3
    finally:
        registry.available_modules.cache_clear()


def test_entry_point_may_not_shadow_builtin(monkeypatch):
    class Fake(Shift):
        name = "qsharp"

    point = EntryPoint(name="qsharp", value="x:y", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(EntryPoint, "load", lambda self: Fake)
    monkeypatch.setattr(registry, "entry_points", lambda group: [point])
    registry.available_modules.cache_clear()
    try:
        with pytest.raises(ValueError, match="already taken"):
            registry.available_modules()
    finally:
        registry.available_modules.cache_clear()


def test_read_guide_info(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 104}))
    (tmp_path / "guide_head.json").write_text(json.dumps({"type": "histogram", "scoring": "v", "atoms": [0, 1]}))
    info = read_guide_info("h", tmp_path)
    assert (info.head_type, info.scoring, info.vocab_size, info.atoms) == ("histogram", "v", 104, (0.0, 1.0))
    with pytest.raises(ValueError, match="'bad'"):
        read_guide_info("bad", tmp_path / "missing")
