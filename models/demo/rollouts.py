"""Rollouts of the base model on training problems, scored by the task's reward.

One pass of sampling with the demo's plain-torch sampler feeds every guide model:
the value models regress each prefix onto the final reward, the reward models learn
from pairs of a correct and an incorrect rollout of the same prompt. Real base models
get their rollouts from the vLLM engine (``alignserve train rollouts``).
"""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from models.demo.evaluate import MAX_NEW_TOKENS
from models.demo.sampling import completion_ids, generate
from models.demo.task import Problem, held_out_problems, reward, sample_problems
from models.demo.tokenizer import format_prompt
from models.runtime.decoder import Decoder
from models.training.rollouts import Rollouts, pad_rows, span_mask

# Training problems are drawn from seed + this offset (the held-out set is excluded by prompt too).
PROBLEM_SEED_OFFSET = 7_000
SAMPLING_CHUNK = 1024  # rows per generate() call, to bound the KV cache


def training_problems(count: int, seed: int) -> list[Problem]:
    """``count`` problems from the training stream of ``seed``, none of them held out."""
    held_out = {p.prompt for p in held_out_problems()}
    candidates = sample_problems(count + len(held_out), seed + PROBLEM_SEED_OFFSET)
    problems = [p for p in candidates if p.prompt not in held_out]
    return problems[:count]


def sample_rollouts(
    base: Decoder,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[Problem],
    samples_per_problem: int,
    seed: int,
    chat_fraction: float = 0.5,
    progress: bool = True,
) -> Rollouts:
    """``samples_per_problem`` temperature-1 rollouts of ``base`` per problem, each problem in the
    plain or (with probability ``chat_fraction``) chat prompt format."""
    rng = random.Random(seed)
    texts = [format_prompt(p.prompt, chat=rng.random() < chat_fraction) for p in problems]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    rows = [i for i in range(len(problems)) for _ in range(samples_per_problem)]
    generator = torch.Generator().manual_seed(seed)
    sequences: list[list[int]] = []
    rewards: list[float] = []
    for start in tqdm(range(0, len(rows), SAMPLING_CHUNK), desc="rollouts", disable=not progress):
        chunk = rows[start : start + SAMPLING_CHUNK]
        tokens = generate(base, [encoded[i] for i in chunk], tokenizer.eos_token_id, MAX_NEW_TOKENS,
                          generator=generator).tokens
        for i, completion in zip(chunk, completion_ids(tokens, tokenizer.eos_token_id)):
            sequences.append(encoded[i] + completion)
            rewards.append(reward(texts[i], tokenizer.decode(completion, skip_special_tokens=True)))
    input_ids = pad_rows(sequences, tokenizer.pad_token_id)
    prompt_lengths = torch.tensor([len(encoded[i]) for i in rows])
    ends = torch.tensor([len(s) for s in sequences])
    completion_mask = span_mask(prompt_lengths, ends, input_ids.shape[1])
    return Rollouts(
        input_ids=input_ids,
        completion_mask=completion_mask,
        target_mask=completion_mask,  # every generated token: the demo regresses all cut points at once
        rewards=torch.tensor(rewards),
        problem=torch.tensor(rows),
    )
