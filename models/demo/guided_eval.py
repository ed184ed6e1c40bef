"""Does guidance help? Accuracy of guided decoding of the demo base on held-out problems.

A reference guided sampler in plain torch (``models.demo.sampling``), independent of
vLLM and of the server's batch runtime: at each step the base logits l of the top-k
candidates C (the module's default k: 20 for qsharp / cd, the whole vocabulary for
arm / genarm) get the module's offset d(s, y) from ``guidance.modules``, computed from
the guide model's scores of (s, y); tokens outside C keep offset 0. Then
y ~ softmax(l + d) (temperature 1) or y = argmax(l + d) (greedy).

Reported per configuration: pass@1 (mean reward of ``samples`` temperature-1 samples per
problem, the same random stream for every configuration), greedy accuracy, and the mean
summed KL(guided || base) of the sampled completions.

    python -m models.demo.guided_eval [--problems 200] [--samples 4] [--output results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from guidance.module import WHOLE_VOCABULARY, GuidanceModule
from guidance.registry import get_module
from models.demo.build import demo_base_dir
from models.demo.evaluate import MAX_NEW_TOKENS
from models.demo.paths import demo_guides_file
from models.demo.sampling import completion_ids, generate, start_cache
from models.demo.task import Problem, held_out_problems, reward
from models.demo.tokenizer import format_prompt
from models.runtime.decoder import Decoder
from models.runtime.guide import GuideModel, load_guide_model
from models.runtime.loader import load_decoder


@dataclass(frozen=True)
class GuidedConfig:
    """One row of the table: a guidance module with a guide model at a strength (none: the base)."""

    module: str | None = None
    model: str | None = None
    strength: float = 0.0

    @property
    def label(self) -> str:
        return "base" if self.module is None else f"{self.module}({self.model}) @ {self.strength:g}"


DEFAULT_CONFIGS: tuple[GuidedConfig, ...] = (
    GuidedConfig(),
    *(GuidedConfig("qsharp", "demo-value", eta) for eta in (1.0, 2.0, 4.0, 8.0)),
    GuidedConfig("qsharp", "demo-value-hist", 4.0),
    *(GuidedConfig("cd", "demo-prefix", lam) for lam in (2.0, 4.0)),
    *(GuidedConfig("arm", "demo-arm", beta) for beta in (1.0, 2.0)),
    *(GuidedConfig("genarm", "demo-genarm", alpha) for alpha in (1.0, 2.0)),
)


@dataclass(frozen=True)
class GuidedResult:
    label: str
    pass_at_1: float
    greedy_accuracy: float
    mean_kl: float


class GuideSteering:
    """Offsets of one guidance module driven by one guide model (a ``sampling.Steering``)."""

    def __init__(self, module: GuidanceModule, model: GuideModel, strength: float) -> None:
        self.module, self.model, self.strength = module, model, strength
        self.head_type = model.head.type
        self.atoms = model.head.atoms if self.head_type == "histogram" else None

    def start(self, prompts: Sequence[Tensor], max_len: int) -> None:
        self.slots, self.hidden = start_cache(self.model.backbone, prompts, max_len)

    def advance(self, tokens: Tensor) -> None:
        self.hidden = self.model.step(self.slots, tokens)

    def offsets(self, logits: Tensor) -> Tensor:
        """``[B, V]`` offsets: d on the candidates C, 0 elsewhere."""
        strength = torch.full((logits.shape[0], 1), self.strength)
        top_k = self.module.default_top_k
        if self.model.scoring == "q":
            scores = self.module.token_scores(self.model.score_next(self.hidden)).float()  # [B, V(, m)]
            if top_k == WHOLE_VOCABULARY:
                return self.module.offsets(scores, strength, self.head_type, self.atoms)
            candidates = logits.topk(top_k, dim=-1).indices  # [B, k]
            index = candidates if scores.dim() == 2 else candidates[..., None].expand(-1, -1, scores.shape[-1])
            candidate_scores = scores.gather(1, index)
        else:
            k = logits.shape[-1] if top_k == WHOLE_VOCABULARY else top_k
            candidates = logits.topk(k, dim=-1).indices  # [B, k]
            candidate_scores = self.model.score_candidates(self.slots, candidates).float()  # [B, k(, m)]
        d = self.module.offsets(candidate_scores, strength, self.head_type, self.atoms)
        return torch.zeros_like(logits).scatter(1, candidates, d)


def mean_reward_and_kl(base: Decoder, tokenizer: PreTrainedTokenizerFast, prompts: list[str],
                       steering: list[GuideSteering], temperature: float, seed: int) -> tuple[float, float]:
    """(mean reward, mean summed KL to the base) of one completion per prompt."""
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    generation = generate(base, encoded, tokenizer.eos_token_id, MAX_NEW_TOKENS, temperature=temperature,
                          generator=torch.Generator().manual_seed(seed), steerings=steering)
    completions = completion_ids(generation.tokens, tokenizer.eos_token_id)
    rewards = [reward(p, tokenizer.decode(c, skip_special_tokens=True)) for p, c in zip(prompts, completions)]
    return sum(rewards) / len(rewards), float(generation.kl.mean())


def evaluate_guidance(
    base_dir: Path,
    guides_file: Path,
    problems: list[Problem],
    configs: Sequence[GuidedConfig] = DEFAULT_CONFIGS,
    samples: int = 4,
    seed: int = 0,
    chat: bool = False,
    progress: bool = True,
) -> list[GuidedResult]:
    """pass@1 (``samples`` per problem), greedy accuracy and KL of each configuration."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(base_dir))
    base = load_decoder(base_dir)
    table = json.loads(Path(guides_file).read_text())
    models = {name: load_guide_model(Path(guides_file).parent / table[name])
              for name in sorted({c.model for c in configs if c.model is not None})}
    prompts = [format_prompt(p.prompt, chat) for p in problems]
    results = []
    for config in tqdm(configs, desc="guided eval", disable=not progress):
        steering = [] if config.module is None else [
            GuideSteering(get_module(config.module), models[config.model], config.strength)]
        pass_at_1, kl = mean_reward_and_kl(base, tokenizer, prompts * samples, steering, temperature=1.0, seed=seed)
        greedy, _ = mean_reward_and_kl(base, tokenizer, prompts, steering, temperature=0.0, seed=seed)
        results.append(GuidedResult(config.label, pass_at_1, greedy, kl))
    return results


def markdown_table(results: Sequence[GuidedResult]) -> str:
    lines = ["| configuration | pass@1 (T=1) | greedy accuracy | mean KL (nats) |", "|---|---|---|---|"]
    lines += [f"| {r.label} | {r.pass_at_1:.3f} | {r.greedy_accuracy:.3f} | {r.mean_kl:.3f} |" for r in results]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Accuracy of guided decoding of the demo base model.")
    parser.add_argument("--base-dir", type=Path, default=demo_base_dir())
    parser.add_argument("--guides", type=Path, default=demo_guides_file(), help="guide-model table (guides.json)")
    parser.add_argument("--problems", type=int, default=200, help="first N held-out problems")
    parser.add_argument("--samples", type=int, default=4, help="temperature-1 samples per problem")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="chat-formatted prompts instead of plain ones")
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    started = time.perf_counter()
    results = evaluate_guidance(args.base_dir, args.guides, held_out_problems()[: args.problems],
                                samples=args.samples, seed=args.seed, chat=args.chat)
    print(markdown_table(results))
    print(f"({args.problems} held-out problems, {args.samples} samples each, {time.perf_counter() - started:.0f} s)")
    if args.output:
        args.output.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
