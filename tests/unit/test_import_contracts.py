"""The package's layering is a contract (pyproject.toml [tool.importlinter]).

The real tree keeps every contract; a small package laid out like `services/` shows
that each contract fails on the violation it exists for: a layer imported upwards,
training importing serving, a cycle between sibling modules, a private name taken
from another module.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(),
                                reason="import-linter is not installed (the dev extra has it)")

# Every module the layers contract names, as a minimal package.
FAKE_MODULES = ["__main__.py", "cli.py", "protogen.py", "demo.py", "evaluate.py", "rollout.py",
                "k8s/__init__.py", "client.py", "training/__init__.py",
                "training/loop.py", "serving/__init__.py", "serving/ingress.py",
                "serving/app.py", "runtime/__init__.py", "core/__init__.py",
                "core/errors.py", "protocol/__init__.py"]


def lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def importlinter_section() -> str:
    """The [tool.importlinter] tables of the project's pyproject.toml, as text."""
    kept, keep = [], False
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        if line.startswith("["):
            keep = line.lstrip("[").startswith("tool.importlinter")
        if keep:
            kept.append(line)
    return "\n".join(kept) + "\n"


def test_the_package_keeps_every_contract():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for contract in ("Layers", "Training and serving are independent", "No import cycles",
                     "private names"):
        assert contract in result.stdout
    assert "BROKEN" not in result.stdout


@pytest.fixture
def fake_project(tmp_path: Path) -> Path:
    """A package named `services` with every layer the contracts name, and no import
    between them: it keeps every contract."""
    for name in FAKE_MODULES:
        path = tmp_path / "services" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('"""fake"""\n')
    (tmp_path / "services" / "__init__.py").write_text('"""fake"""\n')
    (tmp_path / "services" / "core" / "errors.py").write_text("_hidden = 1\nshown = 2\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "__init__.py").write_text("")
    shutil.copy(ROOT / "tests" / "import_contracts.py", tmp_path / "tests")
    (tmp_path / "pyproject.toml").write_text(importlinter_section())
    return tmp_path


def test_a_package_without_violations_passes(fake_project: Path):
    result = lint(fake_project)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("module, source, broken", [
    ("core/__init__.py", "import services.serving\n", "Layers"),
    ("runtime/__init__.py", "from services import training\n", "Layers"),
    ("client.py", "import services.cli\n", "Layers"),
    ("training/loop.py", "import services.serving.ingress\n",
     "Training and serving are independent"),
    ("serving/app.py", "import services.serving.ingress\n", "No import cycles"),
    ("serving/ingress.py", "from services.core.errors import _hidden\n",
     "No module imports another module's private names"),
])
def test_each_contract_fails_on_its_violation(fake_project: Path, module, source, broken):
    if broken == "No import cycles":  # the other half of the cycle
        (fake_project / "services" / "serving" / "ingress.py").write_text(
            "import services.serving.app\n")
    (fake_project / "services" / module).write_text(source)
    result = lint(fake_project)
    assert result.returncode != 0, result.stdout
    broken_lines = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(line.startswith(broken) for line in broken_lines), result.stdout


def test_public_names_and_dunders_are_not_private(fake_project: Path):
    (fake_project / "services" / "serving" / "ingress.py").write_text(
        "from services import __doc__\nfrom services.core.errors import shown\n")
    result = lint(fake_project)
    assert result.returncode == 0, result.stdout + result.stderr
