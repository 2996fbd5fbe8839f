"""``import lmmixup_hf`` is cheap and registers its integrations whichever import order a user picks."""

import ast
import fnmatch
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = """
from transformers.pipelines import PIPELINE_REGISTRY
import datasets.packaged_modules as pm
assert "instruction-distillation" in PIPELINE_REGISTRY.get_supported_tasks()
assert "mixture" in pm._PACKAGED_DATASETS_MODULES
print("ok")
"""


@pytest.mark.parametrize(
    "first",
    [
        "import lmmixup_hf; from transformers import pipeline; import datasets",
        "from transformers.pipelines import PIPELINE_REGISTRY; import datasets; import lmmixup_hf",
        "import datasets; import lmmixup_hf",
    ],
)
def test_integrations_register_in_any_import_order(first):
    r = subprocess.run([sys.executable, "-c", first + "\n" + CHECK], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_import_is_light():
    code = (
        "import sys, lmmixup_hf; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "[]", r.stderr


@pytest.mark.parametrize(
    "module",
    ["lmmixup_hf.integrations.mixture", "lmmixup_hf.distiller.hf_pipeline", "lmmixup_hf.integrations.mixture_export"],
)
def test_importing_an_integration_first_still_registers(module):
    r = subprocess.run(
        [sys.executable, "-c", f"import {module}\n{CHECK}"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def _declared() -> set[str]:
    """The distributions pyproject.toml declares: dependencies and every extra."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    return {re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower().replace("_", "-") for d in specs}


# imported inside ``try: ... except ImportError`` with a fallback, so not a requirement
OPTIONAL = {"certifi"}
NOT_INSTALLED_HERE = {"vllm": "vllm", "flash_attn": "flash-attn", "llama_cpp": "llama-cpp-python"}


def test_every_third_party_import_is_declared():
    """What the package imports at run time is in pyproject.toml (as a dependency or an extra)."""
    root = Path(__file__).resolve().parents[1] / "lmmixup_hf"
    imported: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                imported.setdefault(name.split(".")[0], str(path.relative_to(root.parent)))
    owners = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = {}
    for module, where in sorted(imported.items()):
        if module in sys.stdlib_module_names or module == "lmmixup_hf" or module in OPTIONAL:
            continue
        dists = owners.get(module) or [NOT_INSTALLED_HERE.get(module, module)]
        if not any(d.lower().replace("_", "-") in declared for d in dists):
            missing[module] = where
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_templates_and_data_files_ship_in_the_wheel():
    """Every non-Python file inside the package matches a package-data pattern (the report template too)."""
    tomllib = pytest.importorskip("tomllib")
    top = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((top / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["*"]
    files = [p for p in (top / "lmmixup_hf").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    unshipped = [
        str(p) for p in files if p.suffix != ".py" and not any(fnmatch.fnmatch(p.name, pat) for pat in patterns)
    ]
    assert (top / "lmmixup_hf" / "pipeline" / "report.jinja").is_file()
    assert not unshipped, unshipped
