"""Reading the Dockerfile the way `docker build` does, for the tests that check it
(tests/test_deploy.py) and the ones that build its images (tests/test_images.py)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) for each instruction, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    return [(keyword.upper(), rest.strip()) for keyword, _, rest in (line.strip().partition(" ") for line in lines)]


def stage(target: str, dockerfile: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """The instructions an image built with `--target target` runs: those of the stages it is built
    FROM (their FROM lines dropped but the first), then its own."""
    stages, name = {}, None
    for keyword, args in dockerfile or instructions():
        if keyword == "FROM":
            image, name = re.fullmatch(r"(\S+)(?:\s+as\s+(\S+))?", args, re.I).groups()
            stages[name] = list(stages[image]) if image in stages else [("FROM", image)]
        else:
            stages[name].append((keyword, args))
    return stages[target]


def env_of(dockerfile: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, args in dockerfile:
        if keyword == "ENV":
            for pair in shlex.split(args):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def only(dockerfile, keyword: str) -> str:
    found = [args for k, args in dockerfile if k == keyword]
    assert len(found) == 1, f"expected one {keyword} in the Dockerfile, found {len(found)}"
    return found[0]


def healthcheck_command(dockerfile) -> list[str]:
    args = only(dockerfile, "HEALTHCHECK")
    assert " CMD " in f" {args} ", args
    return json.loads(args.split("CMD", 1)[1])
