"""Supervised training of the demo base model on random arithmetic problems.

Each example is either plain, ``<s>12+34=46</s>``, or chat-formatted exactly
as the chat template renders it, ``<s><|user|>12+34=<|assistant|>46</s>``.
The loss is the mean cross-entropy over the answer tokens and the final
``</s>`` only; the prompt is context, not a target.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from models.demo.task import Problem, sample_problem
from models.demo.tokenizer import EOS_TOKEN, format_prompt
from models.training.loop import warmup_cosine

# Label value that cross-entropy ignores (the transformers convention).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyperparameters (the step count is chosen by the caller)."""

    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    # The learning rate decays by a cosine from its peak to this fraction of it.
    final_lr_fraction: float = 0.1
    max_grad_norm: float = 1.0
    chat_fraction: float = 0.5


def format_example(problem: Problem, chat: bool) -> tuple[str, str]:
    """(prompt text, completion text) of one example; special tokens as text."""
    return format_prompt(problem.prompt, chat), f"{problem.answer}{EOS_TOKEN}"


def training_examples(
    rng: random.Random, exclude: frozenset[str], chat_fraction: float
) -> Iterator[tuple[str, str]]:
    """An endless stream of examples whose problems are not in ``exclude``."""
    while True:
        problem = sample_problem(rng)
        if problem.prompt in exclude:
            continue
        yield format_example(problem, chat=rng.random() < chat_fraction)


def encode_batch(
    tokenizer: PreTrainedTokenizerFast, examples: list[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``labels``, both of shape [batch, length].

    Labels are IGNORE_INDEX on prompt and padding positions. No attention mask
    is needed: padding only follows the real tokens, and causal attention
    never lets a real token see a later position.
    """
    prompts = tokenizer([p for p, _ in examples], add_special_tokens=False)["input_ids"]
    completions = tokenizer([c for _, c in examples], add_special_tokens=False)["input_ids"]
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(examples), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids = prompt + completion
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt) : len(ids)] = torch.tensor(completion)
    return input_ids, labels


def learning_rate_factor(step: int, steps: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``final_lr_fraction``."""
    return warmup_cosine(step, steps, config.warmup_steps, config.final_lr_fraction)


def train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    steps: int,
    seed: int,
    exclude: frozenset[str],
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
) -> float:
    """Train ``model`` in place for ``steps`` AdamW steps; returns the mean
    loss of the last 50 steps. The data stream is drawn from ``seed``."""
    rng = random.Random(seed)
    examples = training_examples(rng, exclude, config.chat_fraction)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, steps, config)
    )
    model.train()
    recent_losses: deque[float] = deque(maxlen=50)
    bar = tqdm(range(steps), desc="train demo base", disable=not progress)
    for _ in bar:
        batch = [next(examples) for _ in range(config.batch_size)]
        input_ids, labels = encode_batch(tokenizer, batch)
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        recent_losses.append(loss.item())
        bar.set_postfix(loss=f"{recent_losses[-1]:.3f}")
    model.eval()
    return sum(recent_losses) / len(recent_losses)
