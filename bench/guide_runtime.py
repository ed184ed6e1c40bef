"""Per-step cost of the guide-model runtime against the live length and against max_model_len.

    .venv/bin/python bench/guide_runtime.py [--rows 16] [--lengths 64,256,1024] [--max-lens 1024,8192]
        [--candidates 20] [--repeats 20] [--record bench/results/guide_runtime.json]

A guide shaped like the SmolLM2-135M guides of the "Bring your own model" issue (4 Llama layers,
hidden 576, 9 query / 3 KV heads of 64, vocabulary 49152; random weights: the cost does not
depend on them) runs in one process on one thread, `rows` rows prefilled to a live length L,
inside a paged KV cache sized for `rows` sequences of max_len (the worst case: no budget). Per
(L, max_len) it times, as the median of `repeats` (small against L: the window barely moves):
`step` (one token per row: what a Q-type guide costs per decoding step) and `score_candidates`
with k candidates per row (a V-type guide's extra cost). The ratios printed side by side are the
claims: at equal L the cost does not grow with max_len (column "/ smallest max_len"), and it
grows with L only through attention (column "/ L=first").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.runtime.config import DecoderConfig  # noqa: E402
from models.runtime.decoder import Decoder  # noqa: E402

SMOLLM2_GUIDE = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                 "num_hidden_layers": 4, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                 "max_position_embeddings": 8192, "tie_word_embeddings": True, "rope_theta": 100000.0}


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


@torch.no_grad()
def measure(decoder: Decoder, rows: int, length: int, max_len: int, candidates: int, repeats: int) -> dict:
    """Rows prefilled to `length` + 1 tokens: one past a multiple of the window's rounding quantum, the
    worst case of `cache.window` (for `length` >= 256 the window stays `length` x 9/8 while the timed
    steps add their tokens)."""
    cache = decoder.setup_cache(rows, max_len)
    slots = [cache.allocate() for _ in range(rows)]
    generator = torch.Generator().manual_seed(0)
    vocab = decoder.config.vocab_size
    decoder.prefill(slots, [torch.randint(vocab, (length + 1,), generator=generator) for _ in slots])
    tokens = torch.randint(vocab, (rows,), generator=generator)
    candidate_ids = torch.randint(vocab, (rows, candidates), generator=generator)
    return {"length": length, "window": cache.window(length + 1), "max_len": max_len, "rows": rows,
            "step_ms": median_ms(lambda: decoder.step(slots, tokens), repeats),
            "score_candidates_ms": median_ms(lambda: decoder.score_candidates(slots, candidate_ids), repeats),
            "cache_mib": cache.kv.numel() * cache.kv.element_size() / 2**20}


def parse_ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--lengths", type=parse_ints, default=[64, 256, 1024])
    parser.add_argument("--max-lens", type=parse_ints, default=[1024, 8192])
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the guide's dtype (bfloat16: what --guide-dtype auto gives on a GPU and on a CPU "
                             "with bfloat16 instructions)")
    parser.add_argument("--record", type=Path, help="write the setup and results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig.from_dict(SMOLLM2_GUIDE)).eval().to(getattr(torch, args.dtype))
    results = [measure(decoder, args.rows, length, max_len, args.candidates, args.repeats)
               for max_len in args.max_lens for length in args.lengths if 2 * length <= max_len]
    base = {(r["length"]): r for r in results if r["max_len"] == args.max_lens[0]}
    first = {(r["max_len"]): r for r in results if r["length"] == args.lengths[0]}
    print(f"guide runtime, {args.dtype}, {args.rows} rows, k={args.candidates}, 1 thread (median of {args.repeats})")
    print("| live length L | window | max_len | step ms | score_candidates ms | step / smallest max_len | "
          "step / L=first | KV pool MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        same_l = f"{r['step_ms'] / base[r['length']]['step_ms']:.2f}" if r["length"] in base else "n/a"
        print(f"| {r['length']} | {r['window']} | {r['max_len']} | {r['step_ms']:.1f} | "
              f"{r['score_candidates_ms']:.1f} | {same_l} | "
              f"{r['step_ms'] / first[r['max_len']]['step_ms']:.2f} | {r['cache_mib']:.0f} |")
    if args.record:
        setup = {**vars(args), "record": str(args.record), "guide": SMOLLM2_GUIDE, "torch_threads": 1}
        args.record.write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
