"""Pass@1 of a causal LM on demo problems, by plain ancestral sampling.

Prompts are grouped by token length so that each group is one batch with
no padding; each group is prefilled once and then decoded with the KV cache.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from models.demo.task import Problem, reward
from models.demo.tokenizer import format_prompt

MAX_NEW_TOKENS = 8


@torch.no_grad()
def _sample_group(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    eos_token_id: int,
    temperature: float,
    max_new_tokens: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Sample continuations of equal-length prompts ``input_ids`` [batch, length].

    Returns [batch, max_new_tokens] token ids; positions after a row's first
    eos hold eos. ``temperature == 0`` means greedy (argmax).
    """
    batch = input_ids.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool)
    generated = torch.full((batch, max_new_tokens), eos_token_id, dtype=torch.long)
    output = model(input_ids=input_ids, use_cache=True)
    for step in range(max_new_tokens):
        logits = output.logits[:, -1, :].float()
        if temperature == 0.0:
            next_ids = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        next_ids = torch.where(finished, eos_token_id, next_ids)
        generated[:, step] = next_ids
        finished |= next_ids == eos_token_id
        if bool(finished.all()):
            break
        output = model(
            input_ids=next_ids[:, None], past_key_values=output.past_key_values, use_cache=True
        )
    return generated


def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    temperature: float = 1.0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    seed: int = 0,
    progress: bool = False,
) -> list[str]:
    """One completion per prompt (text before the first eos, special tokens
    skipped), sampled at ``temperature`` with no top-k / top-p."""
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    groups: dict[int, list[int]] = defaultdict(list)
    for index, ids in enumerate(encoded):
        groups[len(ids)].append(index)
    generator = torch.Generator().manual_seed(seed)
    completions = [""] * len(prompts)
    model.eval()
    for length in tqdm(sorted(groups), desc="sample", disable=not progress):
        indices = groups[length]
        input_ids = torch.tensor([encoded[i] for i in indices])
        generated = _sample_group(
            model, input_ids, tokenizer.eos_token_id, temperature, max_new_tokens, generator
        )
        for index, ids in zip(indices, generated.tolist()):
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            completions[index] = tokenizer.decode(ids, skip_special_tokens=True)
    return completions


def pass_at_1(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[Problem],
    chat: bool,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> float:
    """Mean reward of one sampled completion per problem."""
    prompts = [format_prompt(problem.prompt, chat) for problem in problems]
    completions = sample_completions(
        model, tokenizer, prompts, temperature=temperature, seed=seed, progress=progress
    )
    rewards = [reward(p, c) for p, c in zip(prompts, completions)]
    return sum(rewards) / len(rewards)
