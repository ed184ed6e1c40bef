"""Per-step cost of `GuidanceBatch.apply` with SmolLM2-shaped guides at vocabulary 49152.

    .venv/bin/python bench/guidance_step.py [--rows 32] [--length 64] [--candidates 20] [--q-top-k 20]
        [--repeats 20] [--record bench/results/guidance_step.json]

Every row is steered by two guides shaped like the SmolLM2-135M guides of bench/guide_runtime.py
(random weights: the cost does not depend on them): a V-type prefix scorer (`cd`, scoring
`candidates` appended tokens per row) and a Q-type value model (`qsharp` on a whole-vocabulary
Bernoulli head, offsets on its top `q-top-k` tokens; -1: every token). Rows are prefilled to
`length` + 1 tokens (one past a multiple of the attention window's rounding: its worst case);
each timed step appends one output token per row and calls `apply` on fresh float32 logits, as
vLLM does. Printed, as the median over `repeats` steps on one thread: the whole `apply`, the part
spent inside guide-model calls (step, score_next, score_candidates), and the rest: the batch's
own work (bookkeeping, candidates, offsets, KL).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.guide_runtime import SMOLLM2_GUIDE  # noqa: E402
from guidance.batch import GuidanceBatch  # noqa: E402
from guidance.catalog import GuideCatalog, GuideModelInfo  # noqa: E402
from guidance.spec import parse_guidance  # noqa: E402
from models.runtime import Decoder, DecoderConfig, GuideModel, build_head  # noqa: E402

GUIDES = {"prefix": {"type": "expected", "scoring": "v"}, "value": {"type": "bernoulli", "scoring": "q"}}


def build_guides() -> tuple[dict[str, GuideModel], GuideCatalog]:
    config = DecoderConfig.from_dict(SMOLLM2_GUIDE)
    models, infos = {}, {}
    for name, head in GUIDES.items():
        models[name] = GuideModel(Decoder(config), build_head(head, config.hidden_size, config.vocab_size)).eval()
        infos[name] = GuideModelInfo(name=name, path=Path("<memory>"), head_type=head["type"],
                                     scoring=head["scoring"], vocab_size=config.vocab_size)
    return models, GuideCatalog(infos)


class GuideClock:
    """Wraps each guide model's forward calls to add up the time spent in them."""

    def __init__(self, models: dict[str, GuideModel]) -> None:
        self.seconds = 0.0
        for model in models.values():
            for method in ("step", "score_next", "score_candidates"):
                setattr(model, method, self._timed(getattr(model, method)))

    def _timed(self, call: Callable) -> Callable:
        def timed(*args: object) -> object:
            began = time.perf_counter()
            out = call(*args)
            self.seconds += time.perf_counter() - began
            return out
        return timed


@torch.no_grad()
def measure(args: argparse.Namespace) -> dict:
    models, catalog = build_guides()
    vocab = SMOLLM2_GUIDE["vocab_size"]
    batch = GuidanceBatch(models, catalog, max_requests=args.rows, max_len=args.length + args.repeats + 8)
    guidance = parse_guidance([{"type": "cd", "model": "prefix", "strength": 1.0, "top_k": args.candidates},
                               {"type": "qsharp", "model": "value", "strength": 2.0, "top_k": args.q_top_k}], catalog)
    generator = torch.Generator().manual_seed(0)
    outputs: list[list[int]] = []
    for row in range(args.rows):
        outputs.append([])
        prompt = torch.randint(vocab, (args.length + 1,), generator=generator).tolist()
        batch.add(row, f"r{row}", guidance, prompt, outputs[-1], temperature=0.7)
    clock = GuideClock(models)
    batch.apply(torch.randn(args.rows, vocab, generator=generator))  # prefill: not timed
    totals, in_guides = [], []
    for _ in range(args.repeats + 1):  # the first step is a warm-up
        for output in outputs:
            output.append(int(torch.randint(vocab, (1,), generator=generator)))
        logits = torch.randn(args.rows, vocab, generator=generator) * 3
        clock.seconds = 0.0
        began = time.perf_counter()
        batch.apply(logits)
        totals.append((time.perf_counter() - began) * 1000)
        in_guides.append(clock.seconds * 1000)
    totals, in_guides = totals[1:], in_guides[1:]
    return {"apply_ms": statistics.median(totals), "guide_calls_ms": statistics.median(in_guides),
            "batch_ms": statistics.median(t - g for t, g in zip(totals, in_guides))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--q-top-k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--record", type=Path, help="write the setup and results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    result = measure(args)
    print(f"GuidanceBatch.apply, {args.rows} rows, V={SMOLLM2_GUIDE['vocab_size']}, cd k={args.candidates} (V-type) + "
          f"qsharp top_k={args.q_top_k} (Q-type), 1 thread (median of {args.repeats} steps)")
    print("| apply ms | in guide-model calls ms | batch's own work ms |")
    print("|---|---|---|")
    print(f"| {result['apply_ms']:.1f} | {result['guide_calls_ms']:.1f} | {result['batch_ms']:.1f} |")
    if args.record:
        setup = {**vars(args), "record": str(args.record), "guide": SMOLLM2_GUIDE, "torch_threads": 1}
        args.record.write_text(json.dumps({"setup": setup, "result": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
