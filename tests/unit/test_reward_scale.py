"""Token-reward heads (ARM, GenARM) serve rewards scaled to unit spread of the sequence reward on validation
data: two heads that differ only in scale steer identically once normalised, and the scale reaches every
served path (guidance offsets, sequence scores)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from guidance.batch import GuidanceBatch
from guidance.catalog import GuideCatalog
from guidance.loading import load_guide_models
from guidance.spec import parse_guidance
from models.demo.build import demo_base_dir
from models.runtime import build_head, load_guide_model, load_head, save_head
from models.runtime.loader import load_decoder
from models.runtime.sequence import SequenceScorer
from models.training.guides import Backbone, GuideRecipe
from models.training.loop import FitConfig
from models.training.objectives import GuideTrainee, reward_spread
from models.training.rollouts import to_tensors, write_rollouts
from tests.unit.test_training import demo_records
from workflows.training import train_from_rollouts

V, H = 64, 128


def tripled(head: torch.nn.Module) -> torch.nn.Module:
    """An ARM head whose every token reward is 3x the given one's: r = e_y . (U V^T h) + b . h is linear in U, b."""
    out = copy.deepcopy(head)
    with torch.no_grad():
        out.u.mul_(3.0)
        out.b.mul_(3.0)
    return out


def test_the_spread_scales_with_the_head_and_normalised_rewards_agree() -> None:
    data = to_tensors(demo_records(12), pad_id=0)
    decoder = load_decoder(demo_base_dir())
    torch.manual_seed(0)
    head = build_head({"type": "arm", "scoring": "q", "rank": 4}, decoder.config.hidden_size, decoder.config.vocab_size)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    model = GuideTrainee(decoder, head, 1)
    features = model.features(data.input_ids)
    spread = reward_spread(model, data, features)
    model.head = tripled(head)
    spread_3x = reward_spread(model, data, features)
    assert spread_3x.std == pytest.approx(3 * spread.std, rel=1e-5)
    assert spread_3x.mean == pytest.approx(3 * spread.mean, rel=1e-4, abs=1e-6)
    assert spread_3x.scale * 3 == pytest.approx(spread.scale, rel=1e-5)


def test_a_constant_reward_cannot_be_normalised() -> None:
    data = to_tensors(demo_records(4), pad_id=0)
    decoder = load_decoder(demo_base_dir())
    head = build_head({"type": "arm", "scoring": "q", "rank": 2}, decoder.config.hidden_size, decoder.config.vocab_size)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
    model = GuideTrainee(decoder, head, 1)
    with pytest.raises(ValueError, match="constant"):
        reward_spread(model, data, model.features(data.input_ids))


@pytest.fixture(scope="module")
def guides(tmp_path_factory) -> tuple[GuideCatalog, dict]:
    """One backbone under four heads: ARM `a` (scale 0.5), `a3` = 3a (scale 0.5 / 3), GenARM `lm` (scale 1) and
    `lm2` (the same head, scale 2)."""
    root = tmp_path_factory.mktemp("scaled")
    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, initializer_range=0.2)
    torch.manual_seed(0)
    backbone = LlamaForCausalLM(config)
    arm = build_head({"type": "arm", "scoring": "q", "rank": 4}, H, V)
    lm = build_head({"type": "lm", "scoring": "q"}, H, V)
    with torch.no_grad():
        for p in arm.parameters():
            p.normal_(0, 0.3)
    arm.reward_scale = 0.5
    arm3 = tripled(arm)
    arm3.reward_scale = 0.5 / 3
    lm2 = copy.deepcopy(lm)
    lm2.reward_scale = 2.0
    paths = {}
    for name, head in {"a": arm, "a3": arm3, "lm": lm, "lm2": lm2}.items():
        backbone.save_pretrained(root / name)
        save_head(head, root / name)
        paths[name] = root / name
    catalog = GuideCatalog.from_paths(paths)
    return catalog, load_guide_models(catalog, dtype=torch.float32, device="cpu")


def guided(guides, entries: list[dict], logits: torch.Tensor) -> torch.Tensor:
    catalog, models = guides
    batch = GuidanceBatch(models, catalog, max_requests=1, max_len=32)
    batch.add(0, "r", parse_guidance(entries, catalog), [1, 5, 9], [])
    return batch.apply(logits.clone())


def test_two_heads_that_differ_in_scale_steer_identically_once_normalised(guides) -> None:
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1))
    a = guided(guides, [{"type": "arm", "model": "a", "strength": 1.5}], logits)
    a3 = guided(guides, [{"type": "arm", "model": "a3", "strength": 1.5}], logits)
    assert not torch.allclose(a, logits)
    torch.testing.assert_close(a3, a, rtol=1e-5, atol=1e-5)


def test_the_scale_multiplies_genarm_offsets_and_sequence_scores(guides, tmp_path) -> None:
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(2))
    scaled = guided(guides, [{"type": "genarm", "model": "lm2", "strength": 1.0}], logits)
    doubled = guided(guides, [{"type": "genarm", "model": "lm", "strength": 2.0}], logits)
    torch.testing.assert_close(scaled, doubled, rtol=1e-5, atol=1e-5)
    catalog, _ = guides
    sequences, starts = [[1, 5, 9, 3, 7], [1, 2, 4]], [3, 2]
    raw = SequenceScorer.load(catalog["lm"].path).score(sequences, starts)
    torch.testing.assert_close(SequenceScorer.load(catalog["lm2"].path).score(sequences, starts), 2 * raw)
    assert load_head(catalog["lm2"].path, H, V).reward_scale == 2.0  # written in guide_head.json, read back


@pytest.mark.parametrize("config, message", [
    ({"type": "bernoulli", "scoring": "q", "reward_scale": 2.0}, "token-reward heads"),
    ({"type": "arm", "scoring": "q", "rank": 2, "reward_scale": 0}, "positive finite"),
    ({"type": "lm", "scoring": "q", "reward_scale": "big"}, "positive finite"),
])
def test_bad_reward_scales_are_refused(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_head(config, H, V)


def test_train_writes_the_validation_scale_into_the_head_and_the_card(tmp_path) -> None:
    write_rollouts(demo_records(16), tmp_path / "r.jsonl")
    recipe = GuideRecipe("arm", {"type": "arm", "scoring": "q", "rank": 4}, "preference",
                         fit=FitConfig(steps=3, batch_size=8, eval_every=1))
    card = train_from_rollouts(demo_base_dir(), [tmp_path / "r.jsonl"], recipe, Backbone(demo_base_dir(), 2),
                               tmp_path / "out", validation_fraction=0.25, progress=False)
    scale = card["reward_scale"]
    assert scale["sequences"] == card["rollouts"]["validation"] and scale["scale"] == pytest.approx(
        1 / scale["validation_std"], rel=1e-3)
    assert load_guide_model(tmp_path / "out" / "arm").head.reward_scale == pytest.approx(scale["scale"], rel=1e-5)
