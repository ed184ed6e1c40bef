"""The `alignserve` command line.

    alignserve serve [--model DIR] [--port N] ...   run the OpenAI-compatible server
    alignserve demo build [--output DIR] [--seed N] rebuild the demo base model from a seed
    alignserve demo guides [--seed N]               retrain the demo guide models from the base
    alignserve demo eval [--problems N]             guided vs unguided accuracy of the demo models
    alignserve models import-gguf FILE OUT          convert a GGUF checkpoint to an HF directory
    alignserve models smollm2 OUT                   the packaged SmolLM2-135M-Instruct, converted
    alignserve train prompts|rollouts|value|...     train guide models for a base model
    alignserve eval --prompts FILE ...              pass@1 and KL of guidance and search, through a server
    alignserve run-batch -i FILE -o FILE ...        an OpenAI batch file through the server's endpoints
    alignserve bench [--model DIR] [--smoke] ...    the side-by-side benchmark suite (bench/results/)

The CLI is the composition root: `models`, `train` and `eval` come from `workflows` and
`bench` from `bench.suite` (both sit above `server`), imported when the parser is built.

Every `serve` flag is a field of `server.settings.Settings` and can also be set
with the environment variable ALIGNSERVE_<FIELD> (flags win).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import types
import typing
from pathlib import Path

import psutil
import uvicorn
from pydantic import ValidationError

from server.allocator import log_allocator, restart_with_tcmalloc
from server.lifecycle import Lifecycle
from server.settings import Settings

GRACEFUL_SHUTDOWN_S = 5.0
# After the engine died, the server answers 503 this long before it stops listening and exits.
ENGINE_DEATH_GRACE_S = 2.0


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM first drains: /ready turns 503, new requests get 503,
    in-flight ones finish (up to the drain timeout), then the server exits. A second
    signal exits at once. SIGTERM or SIGINT during start-up (vLLM loading or compiling the
    model) stops the engine processes started so far and exits at once. The server also
    exits, non-zero, when the engine dies (`Lifecycle.exit_code`)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_timeout_s = drain_timeout_s

    def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
        if not self.started:
            # Start-up blocks the event loop (the engine is built synchronously), so nothing would act on
            # a flag before it ends, minutes later; this handler runs between the start-up's own steps.
            logging.getLogger(__name__).warning("signal %d during start-up: stopping the engine processes and "
                                                "exiting", sig)
            stop_child_processes()
            os._exit(0)
        if sig != signal.SIGTERM or self.lifecycle.draining or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self.lifecycle.draining = True  # at once, before the loop runs the drain task
        asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain_and_exit()))

    async def _drain_and_exit(self) -> None:
        await self.lifecycle.drain(self.drain_timeout_s)
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        return await super().on_tick(counter) or self.lifecycle.should_exit(ENGINE_DEATH_GRACE_S)


def stop_child_processes(grace_s: float = 5.0) -> None:
    """SIGTERM every process this one started (vLLM's engine core and workers, and theirs), then SIGKILL
    those still alive after `grace_s`."""
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def _flag_type(annotation: object) -> tuple[type, list[str] | None]:
    """argparse type and choices for a settings field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return str, [str(a) for a in typing.get_args(annotation)]
    return annotation, None  # type: ignore[return-value]


def _is_bool(annotation: object) -> bool:
    """A bool field, or an optional one (unset: vLLM decides)."""
    return annotation is bool or set(typing.get_args(annotation)) == {bool, type(None)}


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field. A bool is a switch (`--x` / `--no-x`); the help gives the
    field's default, or, for an optional field, what its description says happens without it."""
    for name, field in Settings.model_fields.items():
        flag, env = f"--{name.replace('_', '-')}", f"ALIGNSERVE_{name.upper()}"
        default = "the demo model" if field.default_factory else field.default
        if isinstance(default, bool):
            default = str(default).lower()
        suffix = f"env {env}" if default is None else f"env {env}; default: {default}"
        help_text = f"{field.description or name} [{suffix}]".replace("%", "%%")  # argparse formats help with %
        if _is_bool(field.annotation):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        flag_type, choices = _flag_type(field.annotation)
        parser.add_argument(flag, dest=name, type=flag_type, choices=choices, default=None, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings | None:
    """The settings the flags (and the environment) give; None, with each invalid field named on stderr, if
    they are invalid."""
    overrides = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name) is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"]) or "settings"
            print(f"alignserve {args.command}: invalid {field}: {error['msg']}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    from guidance.catalog import GuideCatalog
    from guidance.search.hf_entries import read_scorer_entry
    from guidance.search.remote import read_remote_entry
    from server.app import create_app
    from server.engine import EngineSettingsError, engine_args, engine_config

    settings = settings_from_args(args)
    if settings is None:
        return 2
    try:
        engine_config(engine_args(settings, GuideCatalog.from_paths(settings.guide_model_paths())))
    except EngineSettingsError as exc:
        print(f"alignserve serve: {exc}", file=sys.stderr)
        return 2
    try:
        for name, entry in settings.remote_scorer_entries().items():
            read_remote_entry(name, entry, os.environ)
        for name, entry in settings.scorer_model_entries().items():
            read_scorer_entry(name, entry)
    except ValueError as exc:
        print(f"alignserve serve: invalid guide_models: {exc}", file=sys.stderr)
        return 2
    if settings.preload_tcmalloc:
        restart_with_tcmalloc()  # returns only when tcmalloc is preloaded already, or not installed
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log_allocator(os.environ)
    app = create_app(settings)
    # Connections still open this long after the server stopped accepting (drained, or the engine died) are closed.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = DrainingServer(config, app.state.lifecycle, settings.drain_timeout_s)
    server.run()
    code = app.state.lifecycle.exit_code or 0
    # The engine was shut down with the app; whatever it left (a worker of a dead engine) goes too. Then exit
    # without joining threads: a scorer thread that never returns would hold the interpreter's exit forever.
    stop_child_processes()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _demo_build(args: argparse.Namespace) -> int:
    from models.demo.build import build_demo

    card = build_demo(args.output, seed=args.seed, steps=args.steps)
    print(json.dumps(card, indent=2))
    return 0


def _demo_guides(args: argparse.Namespace) -> int:
    from models.demo.guides import build_guides

    card = build_guides(args.base_dir, args.output_root, seed=args.seed)
    print(json.dumps(card, indent=2))
    return 0


def _demo_eval(args: argparse.Namespace) -> int:
    from models.demo.guided_eval import evaluate_guidance, markdown_table
    from models.demo.task import held_out_problems

    results = evaluate_guidance(args.base_dir, args.guides, held_out_problems()[: args.problems],
                                samples=args.samples, seed=args.seed)
    print(markdown_table(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from models.demo.build import demo_base_dir

    parser = argparse.ArgumentParser(
        prog="alignserve", description="Inference-time alignment server: vLLM with guided decoding."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the OpenAI-compatible server",
        description="Serve a base model over the OpenAI API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /health, /ready). With no flags: the demo model on 127.0.0.1:8000.",
    )
    _add_settings_flags(serve)
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="the demo task and its models")
    demo_commands = demo.add_subparsers(dest="demo_command", required=True, metavar="COMMAND")
    build = demo_commands.add_parser(
        "build", help="rebuild the demo models from a seed",
        description="Train the demo base model on the arithmetic task, reproducibly from a seed, "
        "and print its card (including measured pass@1).",
    )
    build.add_argument("--output", type=Path, default=demo_base_dir(), help="output directory [default: %(default)s]")
    build.add_argument("--seed", type=int, default=0, help="random seed [default: %(default)s]")
    build.add_argument("--steps", type=int, default=None, help="training steps [default: the recipe's]")
    build.set_defaults(run=_demo_build)

    from models.demo.paths import CHECKPOINTS_DIR, demo_guides_file

    guides = demo_commands.add_parser(
        "guides", help="retrain the demo guide models from the demo base model",
        description="Sample rollouts of the base model on training problems and train the demo guide models "
        "(demo-value, demo-value-hist, demo-prefix, demo-arm, demo-genarm, demo-reward) from a seed; write them "
        "with guides.json and print the build card.",
    )
    guides.add_argument("--base-dir", type=Path, default=demo_base_dir(), help="base model [default: %(default)s]")
    guides.add_argument("--output-root", type=Path, default=CHECKPOINTS_DIR,
                        help="where the guide directories and guides.json go [default: %(default)s]")
    guides.add_argument("--seed", type=int, default=0, help="random seed [default: %(default)s]")
    guides.set_defaults(run=_demo_guides)

    evaluate = demo_commands.add_parser(
        "eval", help="accuracy and KL of guided decoding on held-out demo problems",
        description="Pass@1 (temperature 1), greedy accuracy and mean KL to the base of each guidance module "
        "on the demo guide models, with a plain-torch reference sampler (no server).",
    )
    evaluate.add_argument("--base-dir", type=Path, default=demo_base_dir(), help="base model [default: %(default)s]")
    evaluate.add_argument("--guides", type=Path, default=demo_guides_file(),
                          help="guide-model table [default: %(default)s]")
    evaluate.add_argument("--problems", type=int, default=200, help="held-out problems [default: %(default)s]")
    evaluate.add_argument("--samples", type=int, default=4, help="samples per problem [default: %(default)s]")
    evaluate.add_argument("--seed", type=int, default=0, help="random seed [default: %(default)s]")
    evaluate.set_defaults(run=_demo_eval)

    from bench.suite.cli import add_bench_command
    from workflows.eval_cli import add_eval_command
    from workflows.models_cli import add_models_command
    from workflows.run_batch import add_run_batch_command
    from workflows.train_cli import add_train_command

    add_models_command(commands)
    add_train_command(commands)
    add_eval_command(commands)
    add_run_batch_command(commands, _add_settings_flags, settings_from_args)
    add_bench_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
