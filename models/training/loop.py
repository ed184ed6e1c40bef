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

Validation: given ``validation_loss`` (the loss on held-out prompts, never trained on), the
loop evaluates it before the first step and every ``eval_every`` steps, keeps a copy of the
trained weights at the best value, and ends with those weights (``keep_best``; early stopping:
after ``patience`` evaluations without improvement it stops). The curve of both losses is returned
for the guide's card.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
    weight_decay: float = 0.0  # AdamW's decoupled decay, on every trained parameter
    eval_every: int = 25  # steps between validation evaluations
    patience: int | None = None  # evaluations without a better validation loss before stopping (None: never)
    keep_best: bool = True  # end with the weights of the best validation point (else the last step's)

    def __post_init__(self) -> None:
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class FitResult:
    """What a fit did: the mean training loss of its last 20 steps, the steps run, and with validation
    the curve ({step, train_loss (mean since the previous point), validation_loss}) and the best point,
    whose weights the model holds at the end."""

    train_loss: float
    steps_run: int
    curve: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    best_validation_loss: float | None = None
    stopped_early: bool = False


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


def _trained_state(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the parameters a fit changes (the trainable ones and the head's)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in trainable or k.startswith("head.")}


class _Validation:
    """The validation curve of a fit and the weights at its best point."""

    def __init__(self, loss: Callable[[], float], patience: int | None) -> None:
        self.loss, self.patience = loss, patience
        self.curve: list[dict[str, float]] = []
        self.best_step: int | None = None
        self.best_loss = math.inf
        self.best_state: dict[str, Tensor] | None = None
        self.since_best = 0

    def evaluate(self, model: nn.Module, step: int, train_losses: list[float]) -> bool:
        """Record the point at ``step``; whether the fit should stop early."""
        model.eval()
        with torch.no_grad():
            loss = float(self.loss())
        model.train()
        point = {"step": step, "validation_loss": round(loss, 6)}
        if train_losses:
            point["train_loss"] = round(sum(train_losses) / len(train_losses), 6)
        self.curve.append(point)
        if loss < self.best_loss:
            self.best_step, self.best_loss, self.best_state, self.since_best = step, loss, _trained_state(model), 0
            return False
        self.since_best += 1
        return self.patience is not None and self.since_best >= self.patience

    def state(self) -> dict:
        return {"curve": self.curve, "best_step": self.best_step, "best_loss": self.best_loss,
                "best_state": self.best_state, "since_best": self.since_best}

    def restore(self, state: dict) -> None:
        self.curve, self.best_step, self.best_loss = state["curve"], state["best_step"], state["best_loss"]
        self.best_state, self.since_best = state["best_state"], state["since_best"]


def fit(model: nn.Module, loss_fn: Callable[[Tensor], Tensor], count: int, config: FitConfig, seed: int,
        desc: str, progress: bool, checkpoint: Path | None = None,
        validation_loss: Callable[[], float] | None = None) -> FitResult:
    """Minimise ``loss_fn(batch of example indices)`` over ``count`` examples. ``model`` has ``decoder``
    and ``head`` submodules. With ``checkpoint``, the state is saved there every ``CHECKPOINT_EVERY``
    steps and a run finding it resumes from it. With ``validation_loss``, the model ends with the
    weights of the best validation point (see the module's docstring)."""
    rank, world = _world()
    trainable = [p for p in model.parameters() if p.requires_grad]
    head_ids = {id(p) for p in model.head.parameters()}
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in trainable if id(p) not in head_ids], "lr": config.backbone_lr},
         {"params": [p for p in trainable if id(p) in head_ids], "lr": config.head_lr}],
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, config.steps, config.warmup_steps, config.final_lr_fraction))
    batches = index_batches(count, config.batch_size, torch.Generator().manual_seed(seed))
    validation = None if validation_loss is None else _Validation(validation_loss, config.patience)
    start, recent, since_point = 0, [], []
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"], strict=False)  # the trainable part; the rest is the init
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, recent, since_point = state["step"], state["recent"], state.get("since_point", [])
        if validation is not None and state.get("validation") is not None:
            validation.restore(state["validation"])
        for _ in range(start):  # replay the batch stream to where the run stopped
            next(batches)
    model.train()
    stopped_early = False
    if validation is not None and start == 0:
        validation.evaluate(model, 0, [])
    bar = tqdm(range(start, config.steps), desc=desc, disable=not progress or rank != 0,
               initial=start, total=config.steps)
    done = start
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
        since_point.append(loss.item())
        bar.set_postfix(loss=f"{recent[-1]:.3f}")
        done = step + 1
        if validation is not None and (done % config.eval_every == 0 or done == config.steps):
            stopped_early = validation.evaluate(model, done, since_point) and done < config.steps
            since_point = []
            if stopped_early:
                break
        if checkpoint is not None and rank == 0 and (done % CHECKPOINT_EVERY == 0 and done < config.steps):
            _save(checkpoint, model, optimizer, scheduler, done, recent, since_point,
                  None if validation is None else validation.state())
    model.eval()
    result = FitResult(sum(recent) / len(recent) if recent else float("nan"), done)
    if validation is not None:
        if config.keep_best:
            model.load_state_dict(validation.best_state, strict=False)
        result.curve, result.best_step = validation.curve, validation.best_step
        result.best_validation_loss, result.stopped_early = validation.best_loss, stopped_early
    return result


def _save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, step: int,
          recent: list[float], since_point: list[float], validation: dict | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"model": _trained_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "recent": recent, "since_point": since_point,
                "validation": validation}, partial)
    partial.replace(path)
