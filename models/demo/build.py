"""Build the demo base model from a seed: tokenizer, training, evaluation, save.

The output directory holds a ``LlamaForCausalLM`` (safetensors), its
tokenizer, a ``generation_config.json`` with token ids only (so servers apply
no sampling defaults of their own) and ``demo_card.json`` describing the build.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from models.demo.evaluate import pass_at_1
from models.demo.task import HELD_OUT_SEED, held_out_problems
from models.demo.tokenizer import save_tokenizer
from models.demo.train import TrainConfig, train

DEMO_BASE_DIR = Path(__file__).parent / "checkpoints" / "base"
CONTEXT_LENGTH = 512
# Chosen by experiment so that pass@1 at temperature 1 lands near the middle
# of [20%, 80%]: guidance then has room to help. Fixed, not early-stopped,
# so a seed reproduces the checkpoint.
DEFAULT_STEPS = 1000
CARD_NAME = "demo_card.json"


def demo_base_dir() -> Path:
    """Where the committed demo base checkpoint lives."""
    return DEMO_BASE_DIR


def demo_model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """A ~0.8M-parameter Llama. head_dim is 64 because vLLM's CPU attention
    backend rejects smaller heads."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=CONTEXT_LENGTH,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def token_id_generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Token ids only: no temperature / top-k / top-p defaults."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_demo(
    output_dir: Path, seed: int = 0, steps: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train the demo base model from ``seed``, save it to ``output_dir`` and
    return its card (also written as ``demo_card.json``)."""
    steps = DEFAULT_STEPS if steps is None else steps
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tokenizer(output_dir, CONTEXT_LENGTH)
    held_out = held_out_problems()
    config = TrainConfig()

    deterministic_before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(demo_model_config(tokenizer))
        started = time.perf_counter()
        final_loss = train(
            model,
            tokenizer,
            steps=steps,
            seed=seed,
            exclude=frozenset(problem.prompt for problem in held_out),
            config=config,
            progress=progress,
        )
        train_seconds = time.perf_counter() - started
        accuracy = {
            "plain": pass_at_1(model, tokenizer, held_out, chat=False, seed=seed),
            "chat": pass_at_1(model, tokenizer, held_out, chat=True, seed=seed),
            "plain_greedy": pass_at_1(model, tokenizer, held_out, chat=False, temperature=0.0),
            "chat_greedy": pass_at_1(model, tokenizer, held_out, chat=True, temperature=0.0),
        }
    finally:
        torch.use_deterministic_algorithms(deterministic_before)

    model.generation_config = token_id_generation_config(tokenizer)
    model.save_pretrained(str(output_dir))
    card = {
        "seed": seed,
        "steps": steps,
        "train_seconds": round(train_seconds, 1),
        "final_loss": round(final_loss, 4),
        "train_config": vars(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "held_out": {"seed": HELD_OUT_SEED, "size": len(held_out)},
        # Keys without "_greedy": temperature 1, no top-k / top-p, 1 sample each.
        "pass_at_1": {name: round(value, 4) for name, value in accuracy.items()},
        "torch_version": torch.__version__,
    }
    (output_dir / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return card
