"""``import lmmixup_hf`` is cheap and registers its integrations whichever import order a user picks."""

import subprocess
import sys

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
