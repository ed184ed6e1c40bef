"""What the suite sends: the model, its guide models as guided loads, and the prompts.

Each guide model becomes the load of the module its head serves (Bernoulli and histogram value
heads: qsharp; expected-value prefix scorers: cd; ARM heads: arm; LM heads: genarm) at the
module's default top_k, so the suite measures any operator's guide table, not only ours. A scorer
the table serves by URL (``{"url": ...}``) steers no tokens and is no load; ``--scorer`` may name it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from bench.suite.compute_bound import ComputeBound, compute_bound
from guidance.catalog import GuideCatalog, GuideModelInfo
from guidance.module import WHOLE_VOCABULARY
from guidance.registry import get_module

MODULE_FOR_HEAD = {"bernoulli": "qsharp", "histogram": "qsharp", "expected": "cd", "arm": "arm", "lm": "genarm"}
MODULE_ORDER = ("qsharp", "cd", "arm", "genarm")
# Steering strength of every guided load: the cost of a step does not depend on it.
STRENGTH = 2.0


@dataclass(frozen=True)
class GuidedLoad:
    guide: str
    guide_dir: Path
    module: str
    scoring: str
    top_k: int
    bound: ComputeBound

    @property
    def label(self) -> str:
        shape = f"V, k={self.top_k}" if self.scoring == "v" else "Q"
        return f"{self.module}[{self.guide}, {shape}]"

    def body(self) -> dict:
        return {"guidance": [{"type": self.module, "model": self.guide, "strength": STRENGTH}]}


@dataclass(frozen=True)
class Workload:
    model_dir: Path
    guides_file: Path
    served_name: str
    prompts: list[str]
    loads: list[GuidedLoad]
    scorer: str  # the sequence scorer of the best-of-N section

    def prompts_for(self, count: int) -> list[str]:
        return list(itertools.islice(itertools.cycle(self.prompts), count))


def guided_load(model_dir: Path, info: GuideModelInfo) -> GuidedLoad | None:
    module_name = MODULE_FOR_HEAD.get(info.head_type)
    if module_name is None:
        return None  # a sequence reward model: best-of-N only
    module = get_module(module_name)
    top_k = module.default_top_k
    # Q-type heads score only the k candidates unless the module normalises over the vocabulary.
    scored = 0 if top_k == WHOLE_VOCABULARY or (info.scoring == "q" and module.normalises_over_vocabulary) else top_k
    bound = compute_bound(model_dir, info.path, info.scoring, scored)
    return GuidedLoad(info.name, info.path, module_name, info.scoring, top_k, bound)


def default_guides(catalog: GuideCatalog) -> list[str]:
    """One guide per (module, scoring, head) shape, the first by name (guides of one shape cost alike),
    V-type qsharp first: the first guide is the one the length sweep and the HF baseline run."""
    chosen: dict[tuple, str] = {}
    for name in catalog.names():
        info = catalog[name]
        if info.head_type in MODULE_FOR_HEAD:
            chosen.setdefault((MODULE_ORDER.index(MODULE_FOR_HEAD[info.head_type]), info.scoring != "v",
                               info.head_type), name)
    return [chosen[shape] for shape in sorted(chosen)]


def sequence_scorer(catalog: GuideCatalog) -> str:
    """A reward head if the table has one, else the first V-type value model."""
    for kinds in (("reward",), ("bernoulli", "histogram")):
        for name in catalog.names():
            if catalog[name].head_type in kinds and catalog[name].scoring == "v":
                return name
    raise ValueError("the guide table has no sequence scorer (a reward head or a V-type value head) "
                     "for the best-of-N section")


def bench_prompts(model_dir: Path) -> list[str]:
    """Held-out arithmetic questions: chat-arith through the model's chat template for a chat model,
    the demo task's prompts for the demo model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template:
        from models.tasks.chat_arith import problems

        return [tokenizer.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                              add_generation_prompt=True) for p in problems("heldout")]
    from models.demo.task import held_out_problems

    return [p.prompt for p in held_out_problems()]


def build_workload(model_dir: Path, guides_file: Path, served_name: str, guides: list[str] | None,
                   scorer: str | None) -> Workload:
    catalog = GuideCatalog.from_table(guides_file)
    names = guides or default_guides(catalog)
    unknown = [n for n in names if n not in catalog]
    if unknown:
        raise ValueError(f"--guides: {unknown} not guide models of {guides_file} (those are {catalog.names()}; "
                         "a scorer served by URL steers no tokens)")
    loads = [load for name in names if (load := guided_load(model_dir, catalog[name])) is not None]
    return Workload(model_dir, guides_file, served_name, bench_prompts(model_dir), loads,
                    scorer or sequence_scorer(catalog))
