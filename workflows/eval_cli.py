"""``alignserve eval``: pass@1, maj@k and KL to the base of guidance and search, through a server.

    alignserve eval --prompts heldout.jsonl --verifier arith-first-line --out eval/ \\
        --model BASE_DIR --guide-models guides.json \\
        --qsharp value --cd prefix --strengths 0.5,1,2,4,8 --best-of-n arith-first-line value --n 1,2,4,8,16
    alignserve eval ... --qsharp value --cd prefix --kl-budgets 0.25,0.5,1,2 --best-of-n value --n 1,2,4,8

With ``--model`` it starts ``alignserve serve`` on a free port (log: OUT/server.log) and stops it
at the end; with ``--url`` it uses a running server. The configurations are the base, the
sweep the flags describe (``workflows.evaluation.sweep``) and those of ``--configs FILE``
(``workflows.evaluation.configs``), with ``--kl-budgets`` their per-step guidance at each budget
(``sweep.budget_variants``); docs/eval.md explains the outputs. The evaluation modules
(httpx, matplotlib) are imported when the command runs, so building the CLI stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from guidance.search.aggregate import AGGREGATES
from workflows.evaluation.configs import BASE, DEFAULT_MAX_STEPS, ConfigError, EvalConfig, check_unique, read_config_file
from workflows.evaluation.sweep import (
    DEFAULT_BLOCK_CANDIDATES,
    DEFAULT_BLOCK_TOKENS,
    DEFAULT_NS,
    GUIDED_METHODS,
    Sweep,
    budget_variants,
    parse_counts,
    parse_guide_model,
    parse_kl_budgets,
    parse_strengths,
    sweep_configs,
)


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ValueError message becomes argparse's error naming the flag."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _at_least(low: float, kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value >= low:
            raise ValueError(f"must be at least {low:g}, got {text}")
        return value

    return _argument_type(parse)


def _share(include_one: bool) -> Callable[[str], Any]:
    """A number in (0, 1], or in (0, 1) when `include_one` is False, as an argparse type."""
    def parse(text: str) -> float:
        value = float(text)
        if not (0 < value <= 1 if include_one else 0 < value < 1):
            raise ValueError(f"must be in (0, {'1]' if include_one else '1)'}, got {text}")
        return value

    return _argument_type(parse)


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server (one of --model and --url)")
    where = group.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=Path, metavar="DIR",
                       help="base model directory: start `alignserve serve` on it for the run")
    where.add_argument("--url", help="base URL of a running alignserve server, e.g. http://127.0.0.1:8000")
    group.add_argument("--guide-models", type=Path, metavar="FILE",
                       help="with --model: the guide-model table to serve [default: the server's]")
    group.add_argument("--served-model-name", metavar="NAME",
                       help="the model name to request [default: the first of GET /v1/models]")
    group.add_argument("--serve-args", default="", metavar="ARGS",
                       help="with --model: more `alignserve serve` flags, one string, e.g. "
                            "\"--max-model-len 1024 --kv-cache-space-gib 2\"")
    group.add_argument("--start-timeout", type=_at_least(1, float), default=900.0,
                       help="seconds to wait for the started server's /health [default: %(default)s]")


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--samples", type=_at_least(1, int), default=4,
                       help="K, samples per prompt [default: %(default)s]")
    group.add_argument("--temperature", type=_at_least(0, float), default=0.8,
                       help="sampling temperature [default: %(default)s, the Q-sharp paper's]")
    group.add_argument("--top-p", type=_share(include_one=True), default=0.9,
                       help="nucleus sampling [default: %(default)s, the Q-sharp paper's]")
    group.add_argument("--max-tokens", type=_at_least(1, int), default=32,
                       help="tokens per completion [default: %(default)s]")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="a stop string of every request (repeat for several, at most 4: vLLM's limit), "
                            "e.g. for HumanEval --stop $'\\ndef' --stop $'\\nclass' --stop $'\\nif' "
                            "--stop $'\\nprint'")
    group.add_argument("--seed", type=int, default=0,
                       help="sample j of prompt i gets seed + (i*K + j) * S (docs/eval.md) [default: %(default)s]")
    group.add_argument("--concurrency", type=_at_least(1, int), default=32,
                       help="requests in flight at once [default: %(default)s]")
    group.add_argument("--request-timeout", type=_at_least(1, float), default=3600.0,
                       help="seconds one request may take [default: %(default)s]")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "configurations (the unguided base is always run)",
        "MODEL@0.5,1,2 gives a guide model its own strengths instead of --strengths.")
    group.add_argument("--configs", type=Path, metavar="FILE",
                       help="JSON list of {name, method, strength, guidance and/or search} (docs/eval.md)")
    for method in GUIDED_METHODS:
        group.add_argument(f"--{method}", nargs="+", default=[], metavar="MODEL",
                           type=_argument_type(parse_guide_model),
                           help=f"sweep `{method}` guidance of these guide models over the strengths")
    group.add_argument("--contrast-reference", metavar="MODEL",
                       help="the reference of the --contrast experts [default: EXPERT-reference, the name "
                            "`alignserve train expert` gives it]")
    group.add_argument("--strengths", type=_argument_type(parse_strengths), metavar="S,S,...",
                       help="guidance strengths [default: 0.5,1,2,4,8; none with --kl-budgets]")
    group.add_argument("--kl-budgets", type=_argument_type(parse_kl_budgets), default=(), metavar="B,B,...",
                       help="also run each per-step guide model (and each --configs entry with guidance and no "
                            "search) at these KL budgets, nats per response: its entry gets \"max_kl\": B and no "
                            "strength cap (a --configs entry keeps its strength as the cap); results.md then "
                            "tables pass@1 at equal KL (best-of-N at the largest N whose KL fits) and checks "
                            "every response's KL against its budget; reward_kl_frontier.png draws each "
                            "method's frontier. Strengths are then run only where given (--strengths, MODEL@S)")
    group.add_argument("--best-of-n", nargs="+", default=[], metavar="SCORER",
                       help="best-of-N by these scorers (verifiers or guide models), one config per N")
    group.add_argument("--n", type=_argument_type(parse_counts), default=DEFAULT_NS, metavar="N,N,...",
                       help="best-of-N sizes [default: 1,2,4,8,16]")
    group.add_argument("--blockwise", nargs="+", default=[], metavar="SCORER",
                       help="blockwise controlled decoding by these scorers, one config per candidate count")
    group.add_argument("--block-candidates", type=_argument_type(parse_counts), default=DEFAULT_BLOCK_CANDIDATES,
                       metavar="K,K,...", help="blockwise candidates per block [default: 4]")
    group.add_argument("--block-tokens", type=_at_least(1, int), default=DEFAULT_BLOCK_TOKENS,
                       help="blockwise tokens per block [default: %(default)s]")
    group.add_argument("--prune", metavar="SCORER",
                       help="with --best-of-n: also run each N >= 2 pruned by this guide model (search.prune)")
    group.add_argument("--prune-every", type=_at_least(1, int), default=8,
                       help="pruning checkpoint every this many generated tokens [default: %(default)s]")
    group.add_argument("--prune-fraction", type=_share(include_one=False), default=0.5,
                       help="share of the live candidates pruned at a checkpoint [default: %(default)s]")
    group.add_argument("--prune-min-keep", type=_at_least(1, int), default=1,
                       help="candidates never pruned below this many [default: %(default)s]")
    group.add_argument("--min-entropy", type=_argument_type(parse_strengths), default=(), metavar="H,H,...",
                       help="also run each per-step configuration gated at these base entropies (nats)")
    group.add_argument("--step-search", nargs="+", default=[], metavar="SCORER",
                       help="beam search, DVTS and particle filtering by these step scorers (a PRM or a prefix "
                            "scorer), one config per budget N of --n: N candidates per step")
    group.add_argument("--expansions", type=_at_least(1, int), default=4,
                       help="beam's expansions per kept solution and DVTS's beam_width [default: %(default)s]")
    group.add_argument("--step-delimiter", default="\n\n",
                       help="text that ends a step of the step-level searches [default: a blank line]")
    group.add_argument("--max-steps", type=_at_least(1, int), default=DEFAULT_MAX_STEPS,
                       help="most steps of a step-level search's solution [default: %(default)s]")
    group.add_argument("--aggregate", choices=AGGREGATES, default="last",
                       help="how the step-level searches aggregate a solution's step scores [default: last]")
    group.add_argument("--answers", metavar="VERIFIER",
                       help="pick by weighted majority over this verifier's answers: the step-level searches, "
                            "and a weighted best-of-N curve per --best-of-n scorer")


def _configs(args: argparse.Namespace) -> list[EvalConfig]:
    """The base, the flags' sweep, the --configs file's, then their --kl-budgets variants; ConfigError on a
    name used twice or budgets with nothing to budget."""
    if args.prune is not None and not args.best_of_n:
        raise ConfigError("--prune prunes best-of-N: give --best-of-n SCORER too")
    prune = None if args.prune is None else {"scorer": args.prune, "every": args.prune_every,
                                              "fraction": args.prune_fraction, "min_keep": args.prune_min_keep}
    sweep = Sweep(guided={m: tuple(getattr(args, m)) for m in GUIDED_METHODS}, strengths=args.strengths,
                  best_of_n=tuple(args.best_of_n), ns=args.n, blockwise=tuple(args.blockwise),
                  block_candidates=args.block_candidates, block_tokens=args.block_tokens, prune=prune,
                  min_entropies=tuple(h for h in args.min_entropy if h > 0), kl_budgets=args.kl_budgets,
                  step_search=tuple(args.step_search), expansions=args.expansions, answers=args.answers,
                  step_fields={"step_delimiter": args.step_delimiter, "max_steps": args.max_steps,
                               "aggregate": args.aggregate}, contrast_reference=args.contrast_reference)
    listed = read_config_file(args.configs) if args.configs else []
    variants = [variant for config in listed for variant in budget_variants(config, args.kl_budgets)]
    if args.kl_budgets and not any(sweep.guided.values()) and not variants:
        raise ConfigError("--kl-budgets budgets per-step guidance: give --qsharp, --cd, --arm, --genarm or "
                          "--contrast, or --configs entries with guidance, no search and no budget of their own")
    configs = [BASE, *sweep_configs(sweep), *listed, *variants]
    check_unique(configs)
    return configs


@contextmanager
def _server(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(URL, description) of the server to evaluate through: ``--url``, or one started on ``--model``."""
    from workflows.server_process import alignserve_command, start_server

    if args.url is not None:
        yield args.url.rstrip("/"), f"the server at {args.url}"
        return
    flags = shlex.split(args.serve_args)
    if args.guide_models is not None:
        flags += ["--guide-models", str(args.guide_models)]
    if args.served_model_name is not None:
        flags += ["--served-model-name", args.served_model_name]
    print(f"alignserve eval: starting alignserve serve on {args.model} (log: {args.out / 'server.log'})",
          file=sys.stderr)
    with start_server("alignserve serve", lambda port: alignserve_command(args.model, port, flags),
                      args.out / "server.log", timeout_s=args.start_timeout) as server:
        yield server.url, f"served from {args.model} by `alignserve eval`"


def _run(args: argparse.Namespace) -> int:
    from guidance.verifiers import UnknownVerifierError, resolve_verifier
    from workflows.evaluation.pipeline import evaluate, served_model_name
    from workflows.evaluation.reports import RunInfo
    from workflows.evaluation.runner import SamplingSettings
    from workflows.prompt_file import read_prompts, require_answers

    def refuse(message: str) -> int:
        print(f"alignserve eval: {message}", file=sys.stderr)
        return 2

    if args.url is not None and (args.guide_models is not None or args.serve_args):
        return refuse("--guide-models and --serve-args need --model (a running server keeps its own)")
    try:
        verifier = resolve_verifier(args.verifier)
        configs = _configs(args)
    except (UnknownVerifierError, ConfigError, ValueError) as exc:  # ValueError: a module:function not imported
        return refuse(str(exc))
    try:
        records = read_prompts(args.prompts)
        if verifier.needs_reference:
            require_answers(records, verifier.name)
    except (OSError, ValueError) as exc:
        return refuse(f"--prompts: {exc}")
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    try:
        with _server(args) as (url, where):
            model = args.served_model_name or served_model_name(url)
            settings = SamplingSettings(model=model, samples=args.samples, temperature=args.temperature,
                                        top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed,
                                        stop=tuple(args.stop))
            info = RunInfo(command=command, model=model, server=where, prompts_file=str(args.prompts),
                           prompts=len(records), verifier=args.verifier, samples=args.samples,
                           temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                           seed=args.seed, stop=tuple(args.stop))
            rows = asyncio.run(evaluate(url, records, configs, settings, info, args.out,
                                        concurrency=args.concurrency, timeout_s=args.request_timeout,
                                        resume=args.resume))
    except RuntimeError as exc:  # EvalRequestError, or a server that did not start
        print(f"alignserve eval: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # --resume on a run that sampled differently
        return refuse(str(exc))
    print((args.out / "results.md").read_text())
    print(f"alignserve eval: {len(rows)} configurations; results in {args.out}", file=sys.stderr)
    return 0


def add_eval_command(commands: argparse._SubParsersAction) -> None:
    evaluate_parser = commands.add_parser(
        "eval", help="pass@1 and KL of guidance and search, through a server",
        description="Sample every prompt K times under the base and each configuration (fixed seeds, the same\n"
        "for every configuration), score with a verifier, and write results.csv, results.md, results.json,\n"
        "samples.jsonl, reward_vs_kl.png (pass@1 against mean KL to the base, one curve per method) and\n"
        "pass_vs_compute.png (pass@1 against generated tokens and wall seconds per sample)\n"
        "to --out. KL: the server's exact report for per-step guidance; log N - (N-1)/N for best-of-N;\n"
        "not estimated for blockwise selection (docs/eval.md). With --kl-budgets B,B,... each per-step\n"
        "method also runs under each KL budget (max_kl), and results.md adds pass@1 at equal KL (with\n"
        "standard errors, the mean KL spent and a count of responses over budget, which should be 0)\n"
        "and reward_kl_frontier.png each method's reward-KL frontier.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  alignserve eval --url http://127.0.0.1:8000 --prompts heldout.jsonl "
               "--verifier demo-verifier --out eval/ \\\n"
               "      --qsharp demo-value --strengths 1,2,4 --best-of-n demo-verifier --n 2,4,8\n"
               "  alignserve eval --url http://127.0.0.1:8000 --prompts heldout.jsonl "
               "--verifier demo-verifier --out eval-kl/ \\\n"
               "      --qsharp demo-value --cd demo-prefix --kl-budgets 0.25,0.5,1,2 --best-of-n demo-verifier "
               "--n 1,2,4,8,16")
    evaluate_parser.add_argument("--prompts", type=Path, required=True, metavar="FILE",
                                 help="prompt file (JSON Lines of {messages or prompt, answer?, id?})")
    evaluate_parser.add_argument("--verifier", required=True, metavar="NAME",
                                 help="verifier that scores each completion against the prompt's answer: a "
                                      "registered name (e.g. arith-first-line, math) or package.module:function")
    evaluate_parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for the results")
    evaluate_parser.add_argument("--resume", action="store_true",
                                 help="keep the results of configurations an earlier run in --out finished with the "
                                      "same request and sampling settings; run only the others")
    _add_server_flags(evaluate_parser)
    _add_sampling_flags(evaluate_parser)
    _add_config_flags(evaluate_parser)
    evaluate_parser.set_defaults(run=_run)
