"""Who may import whom: pyproject.toml's import contracts (import-linter) hold, and break when a
runtime module imports Keras; model/ has no import cycle, function-level imports included."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))
PACKAGES = ("model", "service", "chargen")

# Every import a -> b inside model/ for which b leads back to a; run in a fresh interpreter so that
# the packages found are those under its working directory.
CYCLES = """
import grimp
graph = grimp.build_graph("model", exclude_type_checking_imports=True, cache_dir=None)
for a in sorted(graph.modules):
    for b in sorted(graph.find_modules_directly_imported_by(a)):
        back = graph.find_shortest_chain(importer=b, imported=a) if b.startswith("model.") else None
        if back:
            print(a, "->", " -> ".join(back))
"""


def copy_of_the_tree(tmp_path: Path) -> Path:
    """model/, service/, chargen/ and pyproject.toml under tmp_path, to break."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def run_here(root: Path, command: list[str]) -> subprocess.CompletedProcess:
    """`command` in `root` with the packages under `root` first on the path (not this checkout's)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the pyproject.toml in `root` (no cache: nothing is written there)."""
    return run_here(root, [LINT_IMPORTS, "--no-cache"])


def test_the_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken." in result.stdout


def test_a_runtime_module_that_imports_keras_breaks_the_contract(tmp_path):
    root = copy_of_the_tree(tmp_path)
    with open(root / "model" / "runtime" / "sampling.py", "a") as f:
        f.write("\nimport keras  # noqa: E402\n")
    result = lint_imports(root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Contracts: 3 kept, 1 broken." in result.stdout
    assert "model.runtime is not allowed to import keras" in result.stdout
    assert "model.runtime.sampling -> keras" in result.stdout
    assert "service is not allowed to import keras" in result.stdout  # through the runtime: indirect imports count


def test_model_has_no_import_cycles():
    result = run_here(ROOT, [sys.executable, "-c", CYCLES])
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_a_cycle_behind_a_function_level_import_is_found(tmp_path):
    root = copy_of_the_tree(tmp_path)
    with open(root / "model" / "runtime" / "state.py", "a") as f:
        f.write("\n\ndef _steps():\n    from model.runtime import onnx_step\n\n    return onnx_step\n")
    result = run_here(root, [sys.executable, "-c", CYCLES])
    assert result.returncode == 0, result.stderr
    assert "model.runtime.onnx_step -> model.runtime.state -> model.runtime.onnx_step" in result.stdout.splitlines()
