"""Re-score the samples an `alignserve eval` wrote with two verifiers and count where they agree.

    python -m bench.verifier_agreement docs/results/smollm2-chat-arith/samples.jsonl \\
        --prompts heldout.jsonl --verifiers math arith-first-line

Each sample is judged as the eval judged it: the prompt's text (`verifier_prompt`), the sample's text and the
prompt file's `answer`. Prints a JSON summary (per configuration and in all) with every disagreement.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from guidance.verifiers import resolve_verifier
from workflows.evaluation.runner import verifier_prompt
from workflows.prompt_file import read_prompts


def agreement(samples: Path, prompts: Path, first: str, second: str) -> dict:
    records = {record.id: record for record in read_prompts(prompts)}
    verifiers = resolve_verifier(first), resolve_verifier(second)
    totals, agreed, disagreements = Counter(), Counter(), []
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        record = records[sample["prompt_id"]]
        rewards = [v(verifier_prompt(record), sample["text"], record.answer) for v in verifiers]
        totals[sample["config"]] += 1
        if rewards[0] == rewards[1]:
            agreed[sample["config"]] += 1
        else:
            disagreements.append({"config": sample["config"], "prompt_id": sample["prompt_id"],
                                  "text": sample["text"], first: rewards[0], second: rewards[1]})
    return {"samples": sum(totals.values()), "agreed": sum(agreed.values()),
            "by_config": {config: f"{agreed[config]}/{count}" for config, count in totals.items()},
            "disagreements": disagreements}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.verifier_agreement", description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", type=Path, help="an eval's samples.jsonl")
    parser.add_argument("--prompts", type=Path, required=True, help="the prompt file it evaluated (with answers)")
    parser.add_argument("--verifiers", nargs=2, required=True, metavar=("FIRST", "SECOND"))
    args = parser.parse_args(argv)
    print(json.dumps(agreement(args.samples, args.prompts, *args.verifiers), indent=2))


if __name__ == "__main__":
    main()
