"""The usual implementation of Q-sharp guidance, as a baseline: HF `generate` with a guide LogitsProcessor.

    .venv/bin/python -m bench.hf_qsharp --base runs/smollm2/base --guide runs/smollm2/guides/value-r2 \
        [--batch-size 8] [--tokens 64] [--requests 16] [--strength 4] [--top-k 20] [--temperature 1]
        [--seed 0] [--threads 1] [--prompts runs/smollm2/prompts/heldout.jsonl]

Without `--guide` it runs plain `generate` with the same sampling (HF unguided). This is how public
research code (the Q-sharp, GenARM and ARM repositories) runs guided decoding: one `generate` call
over a left-padded batch of prompts, the value model called from a `LogitsProcessor` at each step.
It is a competent version of that, not a strawman:

- the guide backbone is a `transformers` model with its own `DynamicCache`, kept across steps: each
  call feeds it only the tokens generated since the last call (the whole prompt on the first);
- V-type heads score the top-k candidates y of all B rows in one forward: the k candidates of a row
  are k query tokens on its prefix cache, each at the position after s and masked to attend to s and
  itself only (B * k one-token continuations, as the reference Q-sharp code runs them, without copying
  the cache k-fold); Q-type heads cost one forward per step and score the whole vocabulary from the
  prefix's hidden state;
- heads and offsets are the project's own (`models.runtime.heads`, `guidance.modules.qsharp`), so the
  offsets are the same function of the guide's hidden states as the server's;
- the offset is added before HF's temperature warper (custom processors run before warpers), i.e.
  divided by the temperature, as in the server and the reference Q-sharp code.

Every request generates exactly `--tokens` tokens (`min_new_tokens == max_new_tokens`, like the
server's `ignore_eos`; HF does it by masking EOS, so EOS is never a candidate). Prompts are used as
given; the CLI applies the base tokenizer's chat template to `messages` rows of `--prompts`.
Batches run one after another; a request's latency is its batch's `generate` time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from transformers import (AutoModel, AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig,
                          LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guidance.module import WHOLE_VOCABULARY  # noqa: E402
from guidance.modules.qsharp import QSharp  # noqa: E402
from models.runtime.heads import GuideHead, load_head  # noqa: E402

QSHARP = QSharp()


@dataclass(frozen=True)
class HFGuide:
    """A guide model loaded with `transformers`: backbone (final-norm hidden states) + project head."""

    backbone: PreTrainedModel
    head: GuideHead

    @property
    def atoms(self) -> Tensor | None:
        return getattr(self.head, "atoms", None)


def load_hf_guide(guide_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> HFGuide:
    """`AutoModel` (no LM head: value heads read the hidden states) + `guide_head.json`/`head.safetensors`,
    both in `dtype`."""
    backbone = AutoModel.from_pretrained(guide_dir, dtype=dtype).to(device).eval()
    head = load_head(guide_dir, backbone.config.hidden_size, backbone.config.vocab_size, device=device).to(dtype)
    if head.type not in QSHARP.head_types:
        raise ValueError(f"{guide_dir}: a {head.type!r} head cannot guide qsharp; it needs {QSHARP.head_types}")
    return HFGuide(backbone, head)


class QSharpLogitsProcessor(LogitsProcessor):
    """Adds d(s, y) = log E[exp(eta R) | s, y] to the top-k candidates y of each row (offset 0 elsewhere).

    One instance per `generate` call (it holds that batch's guide cache). ``prompt_mask`` ``[B, P]`` is the
    left-padded prompt's attention mask; `__call__` takes input_ids ``[B, P + t]`` and scores ``[B, V]``.
    """

    def __init__(self, guide: HFGuide, prompt_mask: Tensor, strength: float, top_k: int) -> None:
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        if top_k == 0 or top_k < WHOLE_VOCABULARY:
            raise ValueError(f"top_k must be positive or {WHOLE_VOCABULARY} (whole vocabulary), got {top_k}")
        if guide.head.scoring == "v" and top_k == WHOLE_VOCABULARY:
            raise ValueError("a V-type guide scores appended candidates: top_k must be positive")
        self.guide, self.top_k = guide, top_k
        self.strength = torch.full((prompt_mask.shape[0], 1), float(strength), device=prompt_mask.device)  # [B, 1]
        self.mask = prompt_mask  # [B, fed]: 0 on left padding
        self.cache = DynamicCache()
        self.fed = 0  # tokens of input_ids already in the guide cache
        self.guide_seconds = 0.0

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        began = time.perf_counter()
        scores = self._guided(input_ids, scores)
        self.guide_seconds += time.perf_counter() - began
        return scores

    def _guided(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        hidden = self._feed(input_ids)  # [B, H]: the prefix s
        vocab = scores.shape[-1]
        k = vocab if self.top_k == WHOLE_VOCABULARY else min(self.top_k, vocab)
        if self.guide.head.scoring == "q" and k == vocab:
            return scores + self._offsets(QSHARP.token_scores(self.guide.head(hidden).float()))
        candidates = scores.topk(k, dim=-1).indices  # [B, k]: C, the top-k of the base logits
        if self.guide.head.scoring == "v":
            candidate_scores = self._score_candidates(candidates)
        else:
            token_scores = QSHARP.token_scores(self.guide.head(hidden).float())  # [B, V(, m)]
            index = candidates if token_scores.dim() == 2 else candidates.unsqueeze(-1).expand(
                -1, -1, token_scores.shape[-1])
            candidate_scores = token_scores.gather(1, index)
        return scores.scatter_add(1, candidates, self._offsets(candidate_scores))  # d = 0 outside C

    def _offsets(self, candidate_scores: Tensor) -> Tensor:
        return QSHARP.offsets(candidate_scores.float(), self.strength, self.guide.head.type, self.guide.atoms)

    def _feed(self, input_ids: Tensor) -> Tensor:
        """Append the tokens not yet seen (the prompt on the first call, then the last sampled token)
        to the guide cache; final-norm hidden state of each row's last token ``[B, H]``."""
        new = input_ids[:, self.fed:]  # [B, n]
        if self.fed:
            self.mask = torch.cat([self.mask, self.mask.new_ones(new.shape)], dim=1)
        # Left padding: a token's position counts the real tokens before it.
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1]:]
        out = self.guide.backbone(input_ids=new, attention_mask=self.mask, position_ids=positions,
                                  past_key_values=self.cache, use_cache=True)
        self.fed = input_ids.shape[1]
        return out.last_hidden_state[:, -1]

    def _score_candidates(self, candidates: Tensor) -> Tensor:
        """V-type: candidates ``[B, k]`` -> head scores ``[B, k(, m)]`` of s + y, from one forward of the k
        candidates of every row as k query tokens on the prefix cache, each at the position right after s
        and attending to s and itself only (the B * k one-token continuations, without copying the cache
        k-fold; the reference Q-sharp code does the same). The k appended cache entries are cropped after."""
        rows, k = candidates.shape
        # Attention mask [B, 1, k, L + k], True = attend: s's real tokens, then the diagonal (y_i itself).
        prefix = self.mask.bool()[:, None, None, :].expand(rows, 1, k, self.mask.shape[1])
        itself = torch.eye(k, dtype=torch.bool, device=candidates.device).expand(rows, 1, k, k)
        positions = self.mask.sum(-1, keepdim=True).expand(rows, k)  # [B, k]: y sits right after s
        out = self.guide.backbone(input_ids=candidates, attention_mask=torch.cat([prefix, itself], dim=-1),
                                  position_ids=positions, past_key_values=self.cache, use_cache=True)
        self.cache.crop(-k)
        return self.guide.head(out.last_hidden_state)


@dataclass
class HFMeasurement:
    requests: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    latencies_s: list[float] = field(default_factory=list)  # per request: its batch's generate time
    guide_seconds: float = 0.0  # of `seconds`, spent in the guide processor (0 unguided)


def generate_batch(base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, guide: HFGuide | None,
                   prompts: list[str], max_tokens: int, strength: float, top_k: int,
                   temperature: float) -> tuple[Tensor, float]:
    """One `generate` call over the left-padded batch: generated token ids ``[B, max_tokens]`` and the
    seconds spent in the guide (0 unguided). Temperature 0 is greedy."""
    device = base.device
    inputs = tokenizer(prompts, padding=True, return_tensors="pt").to(device)
    processors = LogitsProcessorList()
    if guide is not None:
        processors.append(QSharpLogitsProcessor(guide, inputs["attention_mask"], strength, top_k))
    config = GenerationConfig(
        max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None, top_k=0, top_p=1.0,  # plain temperature sampling
        pad_token_id=tokenizer.pad_token_id, eos_token_id=base.generation_config.eos_token_id)
    with torch.no_grad():
        out = base.generate(**inputs, generation_config=config, logits_processor=processors)
    guide_seconds = processors[0].guide_seconds if processors else 0.0
    return out[:, inputs["input_ids"].shape[1]:], guide_seconds


def measure_hf(base_dir: Path, guide_dir: Path | None, prompts: list[str], batch_size: int, max_tokens: int,
               strength: float = 4.0, top_k: int = 20, temperature: float = 1.0, seed: int = 0,
               threads: int | None = 1, device: str = "cpu", dtype: torch.dtype = torch.float32) -> HFMeasurement:
    """Generate `max_tokens` tokens for every prompt, in consecutive batches of `batch_size` (the last may
    be smaller), guided by `guide_dir` or unguided; totals over the timed `generate` calls.

    A 2-token `generate` on the first batch warms up first (untimed). `threads`: torch intra-op
    threads (1 is comparable with vLLM's single-threaded CPU worker; None leaves torch's default).
    `dtype`: of both models' weights and activations (compare at the dtype the server runs).
    """
    if batch_size < 1 or max_tokens < 1 or not prompts:
        raise ValueError(f"need batch_size >= 1, max_tokens >= 1 and prompts; got {batch_size}, {max_tokens}, "
                         f"{len(prompts)} prompts")
    if threads is not None:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device).eval()
    guide = None
    if guide_dir is not None:
        if AutoTokenizer.from_pretrained(guide_dir).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"the tokenizers of {guide_dir} and {base_dir} differ")
        guide = load_hf_guide(guide_dir, device, dtype)
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    generate_batch(base, tokenizer, guide, batches[0], 2, strength, top_k, temperature)
    torch.manual_seed(seed)
    output_tokens, seconds, guide_seconds, latencies = 0, 0.0, 0.0, []
    for batch in batches:
        began = time.perf_counter()
        tokens, batch_guide_seconds = generate_batch(base, tokenizer, guide, batch, max_tokens, strength, top_k,
                                                     temperature)
        elapsed = time.perf_counter() - began
        output_tokens += tokens.numel()
        seconds += elapsed
        guide_seconds += batch_guide_seconds
        latencies += [elapsed] * len(batch)
    return HFMeasurement(requests=len(prompts), output_tokens=output_tokens, seconds=seconds,
                         tokens_per_s=output_tokens / seconds, latencies_s=latencies, guide_seconds=guide_seconds)


def read_prompts(path: Path, tokenizer: PreTrainedTokenizerBase, count: int) -> list[str]:
    """The first `count` rows of a JSONL file (cycled if short): `prompt` as is, `messages` through the
    tokenizer's chat template with the generation prompt."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    texts = [row["prompt"] if "prompt" in row else
             tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
             for row in rows]
    return [texts[i % len(texts)] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--guide", type=Path, help="guide-model directory; unguided without it")
    parser.add_argument("--prompts", type=Path, default=ROOT / "runs/smollm2/prompts/heldout.jsonl")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--strength", type=float, default=4.0)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0 leaves torch's default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    prompts = read_prompts(args.prompts, AutoTokenizer.from_pretrained(args.base), args.requests)
    result = measure_hf(args.base, args.guide, prompts, args.batch_size, args.tokens, args.strength, args.top_k,
                        args.temperature, args.seed, args.threads or None, args.device, getattr(torch, args.dtype))
    mode = f"guided by {args.guide} (strength {args.strength}, top_k {args.top_k})" if args.guide else "unguided"
    print(f"HF generate, {mode}: {result.requests} requests x {args.tokens} tokens, batch {args.batch_size}, "
          f"threads {args.threads or 'default'}")
    print(f"{result.tokens_per_s:.1f} tokens/s ({result.output_tokens} tokens in {result.seconds:.2f} s; "
          f"guide {result.guide_seconds:.2f} s)")


if __name__ == "__main__":
    main()
