"""The optimisation loop shared by every guide-model trainer.

AdamW over the trainable parameters (backbone and head at their own learning rates), a
linear warm-up then a cosine decay, gradient clipping. A run is reproducible from its seed:
the mini-batches are a seeded stream of permutations, so a resumed run (``checkpoint``)
replays the stream to its step and continues exactly where it stopped.

Data parallel (``torchrun --nproc_per_node N alignserve train ...``): when
``torch.distributed`` is initialised, every rank draws the same mini-batch, computes the
loss of its own 1/N share of it, and the gradients are averaged over ranks before each
step, so all ranks keep identical weights (plain all-reduce data parallelism, no
parameter sharding). Rank 0 writes checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

CHECKPOINT_EVERY = 50  # steps between checkpoints of a resumable run


@dataclass(frozen=True)
class FitConfig:
    """Optimisation of one guide model (AdamW, warm-up then cosine decay)."""

    steps: int
    batch_size: int = 128
    head_lr: float = 3e-3
    backbone_lr: float = 1e-3
    warmup_steps: int = 20
    final_lr_fraction: float = 0.1  # the cosine decays from the peak to this fraction of it
    max_grad_norm: float = 1.0


def warmup_cosine(step: int, steps: int, warmup_steps: int, final_fraction: float) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to ``final_fraction``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def index_batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled mini-batches of ``range(count)``, a fresh permutation per epoch."""
    while True:
        yield from torch.randperm(count, generator=generator).split(batch_size)


def _world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_gradients(parameters: list[nn.Parameter], world: int) -> None:
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def fit(model: nn.Module, loss_fn: Callable[[Tensor], Tensor], count: int, config: FitConfig, seed: int,
        desc: str, progress: bool, checkpoint: Path | None = None) -> float:
    """Minimise ``loss_fn(batch of example indices)`` over ``count`` examples; the mean loss of the
    last 20 steps. ``model`` has ``decoder`` and ``head`` submodules. With ``checkpoint``, the
    state is saved there every ``CHECKPOINT_EVERY`` steps and a run finding it resumes from it."""
    rank, world = _world()
    trainable = [p for p in model.parameters() if p.requires_grad]
    head_ids = {id(p) for p in model.head.parameters()}
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in trainable if id(p) not in head_ids], "lr": config.backbone_lr},
         {"params": [p for p in trainable if id(p) in head_ids], "lr": config.head_lr}],
        weight_decay=0.0,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, config.steps, config.warmup_steps, config.final_lr_fraction))
    batches = index_batches(count, config.batch_size, torch.Generator().manual_seed(seed))
    start, recent = 0, []
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"], strict=False)  # the trainable part; the rest is the init
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, recent = state["step"], state["recent"]
        for _ in range(start):  # replay the batch stream to where the run stopped
            next(batches)
    model.train()
    bar = tqdm(range(start, config.steps), desc=desc, disable=not progress or rank != 0,
               initial=start, total=config.steps)
    for step in bar:
        batch = next(batches)
        loss = loss_fn(batch[rank::world] if world > 1 else batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            _average_gradients(trainable, world)
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        recent = (recent + [loss.item()])[-20:]
        bar.set_postfix(loss=f"{recent[-1]:.3f}")
        done = step + 1
        if checkpoint is not None and rank == 0 and (done % CHECKPOINT_EVERY == 0 and done < config.steps):
            _save(checkpoint, model, optimizer, scheduler, done, recent)
    model.eval()
    return sum(recent) / len(recent) if recent else float("nan")


def _save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, step: int,
          recent: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    torch.save({"model": {k: v for k, v in model.state_dict().items() if k in trainable or k.startswith("head.")},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step, "recent": recent}, partial)
    partial.replace(path)
