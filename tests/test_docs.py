"""Every documented snippet runs as written: each ```python block of README.md and docs/*.md is
executed (the blocks of one file share a namespace, in order), and every ``srp-jax`` command
line in their shell blocks is run through the CLI and must exit 0.

The workspace is what a user has after the README's command 1 (``srp-jax demo``: a trained
run in results/smoke_demo). Published dictionaries cannot be downloaded here, so an offline
Hub cache holds the reference fixture under every registry path (and the registry is made to
describe it), which is what ``hub fetch`` / ``hub:`` loads then read. Install commands and the
test command itself are not re-run. A block preceded by ``<!-- doc-test: skip REASON -->`` is
skipped (the reason is required and reported); ``<!-- doc-test: subprocess ENV=VALUE ... -->``
runs a block's command lines in a fresh process with that environment (as a command line's own
``NAME=value`` prefix does); ``<!-- doc-test: bash -->`` runs a block as a bash script.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# documents whose commands another test runs (at reduced sizes: as written they take hours)
COVERED_ELSEWHERE = {"real-models.md": "tests/test_real_models.py", "quickstart.md": "tests/test_real_models.py"}
DOCS = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name not in COVERED_ELSEWHERE)]
FENCE = re.compile(r"^(```+)\s*([\w-]*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*doc-test:\s*(\w+)\s*(.*?)\s*-->\s*$")
SHELL = {"", "bash", "sh", "console", "shell"}
NOT_RERUN = ("python3 -m pip install", "python -m pip install", "pip install", "python3 -m pytest", "python -m pytest")


@dataclasses.dataclass
class Block:
    lang: str
    code: str
    line: int
    directive: tuple[str, str] | None


def parse_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        d = DIRECTIVE.match(lines[j]) if j >= 0 else None
        fence, lang, start = m.group(1), m.group(2).lower(), i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append(Block(lang, "\n".join(body), start + 1, (d.group(1), d.group(2)) if d else None))
        i += 1
    return blocks


ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def logical_lines(code: str) -> list[str]:
    """Shell lines with ``\\`` continuations joined and ``$ `` prompts removed."""
    out = []
    for raw in code.replace("\\\n", " ").splitlines():
        line = raw.strip()
        out.append(line[2:] if line.startswith("$ ") else line)
    return out


def command_lines(code: str) -> list[str]:
    """The ``srp-jax ...`` commands of a shell block (``&&`` chains allowed), each with any
    ``NAME=value`` environment assignments in front of it kept."""
    out = []
    for line in logical_lines(code):
        for part in (p.strip() for p in line.split("&&")):
            words = part.split()
            while words and ENV_ASSIGNMENT.match(words[0]):
                words = words[1:]
            if words and words[0] == "srp-jax":
                out.append(part)
    return out


def split_env(line: str) -> tuple[dict[str, str], list[str]]:
    """``A=1 B=2 srp-jax x y`` -> ({A: 1, B: 2}, [x, y])."""
    words = shlex.split(line, comments=True)
    env = {}
    while words and ENV_ASSIGNMENT.match(words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words and words[0] == "srp-jax", line
    return env, words[1:]


def test_documents_covered_elsewhere_are_tested_there():
    for name, test in COVERED_ELSEWHERE.items():
        assert (REPO / "docs" / name).is_file() and name in (REPO / test).read_text(encoding="utf-8"), (name, test)


def test_parser_finds_blocks_directives_and_commands():
    text = "x\n<!-- doc-test: skip needs a GPU -->\n\n```bash\n$ srp-jax demo  # hi\npip install x && srp-jax hub list\n```\n```python\nprint(1)\n```\n"
    blocks = parse_blocks(text)
    assert [(b.lang, b.directive) for b in blocks] == [("bash", ("skip", "needs a GPU")), ("python", None)]
    assert command_lines(blocks[0].code) == ["srp-jax demo  # hi", "srp-jax hub list"]
    env_block = "# fake devices\nXLA_FLAGS=--x=8 JAX_PLATFORMS=cpu \\\n  srp-jax train --out r\n"
    (line,) = command_lines(env_block)
    assert split_env(line) == ({"XLA_FLAGS": "--x=8", "JAX_PLATFORMS": "cpu"}, ["train", "--out", "r"])
    assert shlex.split("srp-jax demo  # hi", comments=True) == ["srp-jax", "demo"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """README command 1 done (srp-jax demo in results/smoke_demo) plus an offline Hub cache."""
    from srp_jax import hub
    from srp_jax.cli.main import main

    root = tmp_path_factory.mktemp("docs")
    cache = root / "hf-cache"
    rev = "0123456789abcdef0123456789abcdef01234567"
    fixture = REPO / "tests" / "fixtures" / "reference" / "topk" / "checkpoint.pt"
    mp = pytest.MonkeyPatch()
    for repo in (hub.DEFAULT_REPO_ID, hub.ALTERNATE_REPO_ID):
        folder = cache / f"models--{repo.replace('/', '--')}"
        for entry in hub.registry():
            target = folder / "snapshots" / rev / entry.hub_file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(fixture.read_bytes())
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(rev)
    # the fixture stands in for every published dictionary: make the registry describe it
    small = tuple(dataclasses.replace(e, d_model=64, d_features=256, k=16) for e in hub.registry())
    mp.setattr(hub, "registry", lambda: small)
    mp.setenv("HF_HUB_CACHE", str(cache))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.delenv(hub.REPO_ENV, raising=False)
    (root / "configs").symlink_to(REPO / "configs")  # paths as in a checkout (configs/smoke.yaml)
    mp.chdir(root)
    assert main(["demo"]) == 0
    yield root
    mp.undo()


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_documented_snippets_run(doc, workspace, capsys):
    from srp_jax.cli.main import main

    from srp_jax import factorizers

    namespace: dict = {"__name__": f"doc:{doc.name}"}
    skipped = []
    registered = set(factorizers.architecture_names())
    for block in parse_blocks(doc.read_text(encoding="utf-8")):
        where = f"{doc.name}:{block.line}"
        kind, arg = block.directive or ("", "")
        if kind == "skip":
            assert arg, f"{where}: a skipped block must say why"
            skipped.append(f"{where} ({arg})")
            continue
        if block.lang == "python":
            code = compile(block.code, where, "exec")
            exec(code, namespace)  # noqa: S102 - our own documentation
        elif block.lang in SHELL and kind == "bash":  # run the block as a script (loops, &, wait, export)
            bindir = str(Path(sys.executable).parent)
            env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=workspace, env=env,
                                  capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"{where}: the block exited {proc.returncode}: {proc.stderr[-3000:]}"
        elif block.lang in SHELL:
            for line in command_lines(block.code):
                env_extra, argv = split_env(line)
                if kind == "subprocess":
                    env_extra = {**env_extra, **dict(item.split("=", 1) for item in shlex.split(arg))}
                if env_extra:  # the environment matters before jax starts: a fresh process
                    env = {**os.environ, **env_extra}
                    proc = subprocess.run([sys.executable, "-m", "srp_jax.cli.main", *argv], cwd=workspace, env=env,
                                          capture_output=True, text=True, timeout=900)
                    assert proc.returncode == 0, f"{where}: `{line}` exited {proc.returncode}: {proc.stderr[-2000:]}"
                else:
                    code = main(argv)
                    assert code == 0, f"{where}: `{line}` exited {code}: {capsys.readouterr().err[-2000:]}"
            if block.lang != "":
                for line in logical_lines(block.code):  # shell lines that are neither srp-jax nor installs
                    if line and not line.startswith("#") and not command_lines(line) and not line.startswith(NOT_RERUN):
                        pytest.fail(f"{where}: shell line `{line}` is neither an srp-jax command nor an install")
    for name in set(factorizers.architecture_names()) - registered:  # a doc may register an architecture
        factorizers.unregister(name)
    if skipped:
        print("skipped blocks:", "; ".join(skipped))
