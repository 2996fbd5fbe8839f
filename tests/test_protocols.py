"""The judges, engines and embedders meet the small protocols the stages and executors are typed with."""

from __future__ import annotations

from lmmixup_hf.distiller.engines import Engine, Generation
from lmmixup_hf.embed.embeddings import Embedder, TextEmbedder
from lmmixup_hf.judge.judges import OpenAIJudge
from lmmixup_hf.judge.protocol import Judge
from lmmixup_hf.models.cache import ResponseCache
from lmmixup_hf.models.pricing import Usage


def test_the_api_judge_is_a_judge_and_flushes_its_cache(tmp_path):
    judge = OpenAIJudge("stub", base_url="http://127.0.0.1:9/v1", api_key="k", cache_dir=tmp_path)
    assert isinstance(judge, Judge) and isinstance(judge.usage, Usage)
    judge.client.cache.put("key", {"text": "{}"})
    judge.flush()  # the public way to commit (what a Ray actor calls after each batch)
    assert ResponseCache(judge.client.cache.path).get("key") == {"text": "{}"}  # on disk for another process


def test_the_embedder_is_a_text_embedder_without_loading_a_model():
    e = Embedder("minilm-offline", cache=False, show_progress=False)
    assert isinstance(e, TextEmbedder) and e._model is None
    e.flush()  # nothing buffered without a cache: a no-op


def test_any_object_with_the_members_is_an_engine():
    class Echo:
        name, model = "echo", "none"
        tokenizer = None

        def generate(self, conversations, **kwargs):
            return [Generation(c[-1]["content"], 0, 0, "stop") for c in conversations]

        def describe(self):
            return {"engine": self.name}

        def flush(self):
            pass

    assert isinstance(Echo(), Engine)
    assert not isinstance(object(), Engine)
