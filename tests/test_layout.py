"""The package's layering is a checked contract: `make lint` fails when a lower layer imports a higher one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_keeps_its_layers():
    r = lint(ROOT)
    assert r.returncode == 0 and "5 kept, 0 broken" in r.stdout, r.stdout + r.stderr


def test_a_lower_layer_importing_a_higher_one_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "lmmixup_hf", tmp_path / "lmmixup_hf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    schema = tmp_path / "lmmixup_hf" / "data" / "schema.py"
    schema.write_text(schema.read_text() + "\nfrom lmmixup_hf.pipeline import run  # noqa: E402\n")
    r = lint(tmp_path)
    assert r.returncode != 0 and "lmmixup_hf.data is not allowed to import lmmixup_hf.pipeline" in r.stdout, r.stdout


def test_the_executor_base_importing_ray_or_a_stage_breaks_the_contracts(tmp_path):
    shutil.copytree(ROOT / "lmmixup_hf", tmp_path / "lmmixup_hf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    base = tmp_path / "lmmixup_hf" / "execution" / "base.py"
    base.write_text(
        base.read_text() + "\nimport ray  # noqa: E402\nfrom lmmixup_hf.stages import rate  # noqa: E402\n"
    )
    r = lint(tmp_path)
    assert r.returncode != 0, r.stdout
    assert (
        "the executor base and the blocks import no Ray BROKEN" in r.stdout
        and "the executors know no stage BROKEN" in r.stdout
    )


MAX_LINES = 500


def test_no_module_passes_500_lines():
    """A module that grows past this does more than one job: split it along its seams."""
    long = {
        str(p.relative_to(ROOT)): n
        for p in sorted((ROOT / "lmmixup_hf").rglob("*.py"))
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_parsing_modules_importing_torch_or_an_http_client_break_the_contract(tmp_path):
    shutil.copytree(ROOT / "lmmixup_hf", tmp_path / "lmmixup_hf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    parsing = tmp_path / "lmmixup_hf" / "judge" / "parsing.py"
    parsing.write_text(parsing.read_text() + "\nimport aiohttp  # noqa: E402\n")
    r = lint(tmp_path)
    assert r.returncode != 0 and "lmmixup_hf.judge.parsing is not allowed to import aiohttp" in r.stdout, r.stdout


def test_no_private_name_is_imported_across_packages():
    """A package's ``_private`` names are its own business: other packages use public methods."""
    import ast

    crossings = []
    for path in sorted((ROOT / "lmmixup_hf").rglob("*.py")):
        package = path.relative_to(ROOT).parts[1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmmixup_hf."):
                other = node.module.split(".")[1]
                private = [a.name for a in node.names if a.name.startswith("_")]
                if other != package and private:
                    crossings.append(f"{path.relative_to(ROOT)}: {node.module}.{', '.join(private)}")
    assert not crossings, crossings
