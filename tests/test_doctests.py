"""The examples in the docstrings of the documented API run, and say what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

# the modules of the names in docs/python-api.md, plus the storage helper; each example is cheap
# (tiny in-memory data, no model loaded, no request sent)
MODULES = [
    "lmmixup_hf.data.io",
    "lmmixup_hf.data.quality",
    "lmmixup_hf.distiller.engines",
    "lmmixup_hf.embed.embeddings",
    "lmmixup_hf.judge.judges",
    "lmmixup_hf.models.kvstore",
    "lmmixup_hf.stages.cluster",
    "lmmixup_hf.stages.distill",
    "lmmixup_hf.stages.longtail",
    "lmmixup_hf.stages.mix",
    "lmmixup_hf.stages.rate",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, minilm_path):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (run pytest -s)"


def test_the_documented_cores_have_examples():
    from lmmixup_hf.data.io import normalize
    from lmmixup_hf.data.quality import split_by_quality
    from lmmixup_hf.distiller.engines import make_engine
    from lmmixup_hf.embed.embeddings import get_embedder, row_embeddings
    from lmmixup_hf.judge.judges import make_judge
    from lmmixup_hf.stages.cluster import cluster_rows
    from lmmixup_hf.stages.distill import distill_rows
    from lmmixup_hf.stages.longtail import longtail_rows
    from lmmixup_hf.stages.mix import mix_rows
    from lmmixup_hf.stages.rate import rate_rows

    api = [normalize, split_by_quality, make_engine, get_embedder, row_embeddings, make_judge, cluster_rows]
    api += [distill_rows, longtail_rows, mix_rows, rate_rows]
    for fn in api:
        doc = fn.__doc__ or ""
        assert "Args:" in doc and "Returns:" in doc and "Example" in doc, fn.__qualname__
