"""Three ways to run the distiller behind one interface: ``transformers``, ``vllm`` and ``openai``.

Every engine takes chat messages (built by :mod:`lmmixup_hf.distiller.prompts`) and returns one
:class:`Generation` per conversation, in order. Decoding is greedy unless a temperature is given,
and stops at EOS and at ``</answer>`` (the end of the output contract), so no tokens are spent
after the answer::

    engine = make_engine("transformers", "smollm2-135m-offline")
    engine.generate([build_messages("Q: a\\nA: b", "qa")], max_new_tokens=256)[0].text
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args, runtime_checkable

from lmmixup_hf.data.schema import LmmixupError
from lmmixup_hf.models.registry import resolve_model

logger = logging.getLogger(__name__)

STOP = ("</answer>",)
EngineName = Literal["transformers", "vllm", "openai"]
ENGINES: tuple[str, ...] = get_args(EngineName)
Messages = list[dict[str, str]]


@dataclass
class Generation:
    """One response: the text (cut after the first stop string), token counts and why it ended
    (``stop``: EOS or a stop string; ``length``: ``max_new_tokens`` reached; ``error``)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    error: str | None = None


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Keep ``text`` up to and including the first stop string (case-insensitive)."""
    best = None
    for s in stop:
        m = re.search(re.escape(s), text, re.I)
        if m and (best is None or m.end() < best):
            best = m.end()
    return (text[:best], True) if best is not None else (text, False)


@runtime_checkable
class Engine(Protocol):
    """What the distill core and the executors need of an engine: ``generate(conversations, ...) ->
    list[Generation]``, a tokenizer that can apply the model's chat template (used to keep prompts
    within the token budget), ``describe()`` for the manifest (usage included) and ``flush()``.
    The engines below subclass it for the defaults; any object with these members is an engine."""

    name = "engine"
    model: str

    def generate(
        self,
        conversations: Sequence[Messages],
        max_new_tokens: int = 1024,
        temperature: float = 0.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] = STOP,
    ) -> list[Generation]:
        """One :class:`Generation` per conversation, in order."""
        raise NotImplementedError

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (``apply_chat_template``, ``encode``)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What goes into the manifest (never secrets)."""
        return {"engine": self.name, "model": self.model}

    def flush(self) -> None:
        """Commit anything buffered (a reply cache), e.g. before a worker may be stopped."""


# -- transformers ---------------------------------------------------------------------------------
class TransformersEngine(Engine):
    """Batched ``model.generate`` with left padding; fp32 on CPU, bf16 on GPU; ``sdpa`` attention
    unless ``attn_implementation="flash_attention_2"`` is asked for (needs the flash-attn extra).

    ``scaffold=True`` is for small untrained models (the offline demo's SmolLM2): decoding runs in
    two phases, reasoning inside ``<think>`` (at most ``think_tokens``), then the answer after
    ``<answer>`` + ``answer_prefix``, with the tags written by the engine. A trained distiller does
    not need it."""

    name = "transformers"

    def __init__(
        self,
        model: str,
        *,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        seed: int = 0,
        scaffold: bool = False,
        think_tokens: int = 48,
        answer_prefix: str = "",
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = model
        self.scaffold = scaffold
        self.think_tokens = think_tokens
        self.answer_prefix = answer_prefix
        self.batch_size = max(1, int(batch_size))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.seed = seed
        path = resolve_model(model)
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        self._tok = AutoTokenizer.from_pretrained(path, padding_side="left", trust_remote_code=trust_remote_code)
        if self._tok.pad_token_id is None:
            self._tok.pad_token = self._tok.eos_token
        self._model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        ).to(self.device)
        self._model.eval()
        self.attn_implementation = attn_implementation
        self.dtype = str(torch_dtype).replace("torch.", "")
        eos = self._model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self._tok.eos_token_id is not None and self._tok.eos_token_id not in eos:
            eos.append(self._tok.eos_token_id)
        self.eos_ids = eos

    @property
    def tokenizer(self) -> Any:
        return self._tok

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "device": self.device,
            "dtype": self.dtype,
            "attn_implementation": self.attn_implementation,
            "batch_size": self.batch_size,
            **(
                {"scaffold": True, "think_tokens": self.think_tokens, "answer_prefix": self.answer_prefix}
                if self.scaffold
                else {}
            ),
        }

    def generate(
        self, conversations, max_new_tokens=1024, temperature=0.0, top_p=1.0, repetition_penalty=1.0, stop=STOP
    ) -> list[Generation]:
        texts = [self._tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        sampling = dict(temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty)
        if not self.scaffold:
            return self._generate_texts(texts, max_new_tokens, stop, **sampling)
        # Scaffolded decoding for models that never learned the output contract: the engine writes
        # the tags, the model writes everything between them (its reasoning, then its answer).
        head = "<think>\n"
        thoughts = self._generate_texts(
            [t + head for t in texts], min(self.think_tokens, max_new_tokens), ("</think>", "<answer>"), **sampling
        )
        thinks = [re.split(r"</think>|<answer>", g.text, maxsplit=1, flags=re.I)[0].strip() for g in thoughts]
        bridges = [f"{head}{th}\n</think>\n\n<answer>\n{self.answer_prefix}" for th in thinks]
        budget = max(1, max_new_tokens - max(g.completion_tokens for g in thoughts))
        answers = self._generate_texts([t + b for t, b in zip(texts, bridges)], budget, stop, **sampling)
        out = []
        for t1, b, g in zip(thoughts, bridges, answers):
            text = b + g.text
            if g.finish_reason == "stop" and not re.search(r"</answer>", g.text, re.I):
                text = text.rstrip() + "\n</answer>"  # the model ended its answer with EOS
            out.append(Generation(text, t1.prompt_tokens, t1.completion_tokens + g.completion_tokens, g.finish_reason))
        return out

    def _generate_texts(
        self,
        texts: list[str],
        max_new_tokens: int,
        stop: Sequence[str],
        temperature: float,
        top_p: float,
        repetition_penalty: float,
    ) -> list[Generation]:
        import torch

        lengths = [len(self._tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # similar lengths share a batch
        out: list[Generation | None] = [None] * len(texts)
        sampling = temperature > 0
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": sampling,
            "temperature": temperature if sampling else None,
            "top_p": top_p if sampling else None,
            "top_k": None,
            "repetition_penalty": repetition_penalty,
            "eos_token_id": self.eos_ids,
            "pad_token_id": self._tok.pad_token_id,
        }
        if stop:
            gen_kwargs.update(stop_strings=list(stop), tokenizer=self._tok)
        if sampling:
            torch.manual_seed(self.seed)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self._tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.inference_mode():
                seqs = self._model.generate(**enc, **gen_kwargs)
            new = seqs[:, enc["input_ids"].shape[1] :].cpu()
            for row, i in enumerate(idx):
                out[i] = self._one(new[row].tolist(), lengths[i], max_new_tokens, stop)
        return out  # type: ignore[return-value]

    def _one(self, ids: list[int], prompt_tokens: int, max_new_tokens: int, stop: Sequence[str]) -> Generation:
        ended = False
        for j, t in enumerate(ids):
            if t in self.eos_ids:
                ids, ended = ids[:j], True
                break
        while ids and ids[-1] == self._tok.pad_token_id:  # padding after a stop string
            ids, ended = ids[:-1], True
        text, stopped = cut_at_stop(self._tok.decode(ids, skip_special_tokens=True), stop)
        done = ended or stopped or len(ids) < max_new_tokens
        return Generation(text, prompt_tokens, len(ids), "stop" if done else "length")


# -- vLLM -----------------------------------------------------------------------------------------
class VLLMEngine(Engine):
    """Offline ``vllm.LLM.chat`` with continuous batching. ``tensor_parallel_size`` shards one
    model over GPUs; ``data_parallel_size`` runs replicas (vLLM's own engine argument)."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
        **llm_kwargs: Any,
    ):
        try:
            import vllm
        except ImportError:
            raise LmmixupError(
                "engine 'vllm' needs vLLM on a GPU host: pip install 'lmmixup-hf[vllm]' "
                "(or use --engine transformers, or --engine openai against `vllm serve`)"
            ) from None
        self.model = model
        self.tensor_parallel_size = tensor_parallel_size
        self.data_parallel_size = data_parallel_size
        kwargs: dict[str, Any] = dict(
            model=resolve_model(model),
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            trust_remote_code=trust_remote_code,
            seed=seed,
            **llm_kwargs,
        )
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if data_parallel_size > 1:
            kwargs["data_parallel_size"] = data_parallel_size
        self._vllm = vllm
        self._llm = vllm.LLM(**kwargs)

    @property
    def tokenizer(self) -> Any:
        return self._llm.get_tokenizer()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "tensor_parallel_size": self.tensor_parallel_size,
            "data_parallel_size": self.data_parallel_size,
        }

    def generate(
        self, conversations, max_new_tokens=1024, temperature=0.0, top_p=1.0, repetition_penalty=1.0, stop=STOP
    ) -> list[Generation]:
        params = self._vllm.SamplingParams(
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p if temperature > 0 else 1.0,
            repetition_penalty=repetition_penalty,
            stop=list(stop),
            include_stop_str_in_output=True,
        )
        outputs = self._llm.chat(list(conversations), params, use_tqdm=False)
        gens = []
        for o in outputs:
            c = o.outputs[0]
            reason = "length" if c.finish_reason == "length" else "stop"
            gens.append(Generation(c.text, len(o.prompt_token_ids or []), len(c.token_ids), reason))
        return gens


# -- OpenAI-compatible server ---------------------------------------------------------------------
class OpenAIEngine(Engine):
    """Any ``/v1/chat/completions`` server (``vllm serve``, llama.cpp, OpenAI) through the shared
    :class:`~lmmixup_hf.models.llm_client.ChatClient`: bounded concurrency, retries, cache, usage.
    A request that still fails after ``max_retries`` comes back as ``finish_reason="error"`` with
    the error, never as text.

    The tokenizer (for the prompt budget) is loaded from ``tokenizer`` or the model name when that
    is a local folder or cached Hub id; otherwise prompts are measured at ~4 characters a token."""

    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 16,
        cache_dir: str | None = None,
        tokenizer: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 6,
        retry_base_delay: float = 1.0,
        seed: int | None = None,
        show_progress: bool = True,
    ):
        from lmmixup_hf.models.llm_client import ChatClient

        self.model = model
        self.seed = seed
        self.show_progress = show_progress
        self.client = ChatClient(
            model,
            base_url=base_url,
            api_key=api_key,
            max_concurrency=max_concurrency,
            cache_dir=cache_dir,
            timeout=timeout,
            max_retries=max_retries,
            base_delay=retry_base_delay,
        )
        self._tok = _load_tokenizer(tokenizer or model)

    @property
    def tokenizer(self) -> Any:
        return self._tok

    def flush(self) -> None:
        """Commit the reply cache's buffered writes."""
        self.client.flush()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "base_url": self.client.base_url,
            "max_concurrency": self.client.max_concurrency,
            "usage": self.client.usage.as_dict(),
        }

    def generate(
        self, conversations, max_new_tokens=1024, temperature=0.0, top_p=1.0, repetition_penalty=1.0, stop=STOP
    ) -> list[Generation]:
        params: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature}
        if temperature > 0:
            params["top_p"] = top_p
        if stop:
            params["stop"] = list(stop)
        if self.seed is not None:
            params["seed"] = self.seed
        if repetition_penalty != 1.0:  # vLLM's server accepts it as an extra body field
            params["extra_body"] = {"repetition_penalty": repetition_penalty}
        results = self.client.complete_many(
            list(conversations), desc="distill", show_progress=self.show_progress, **params
        )
        gens = []
        for r in results:
            if not r.ok:
                gens.append(Generation("", 0, 0, "error", r.error))
                continue
            text, _ = cut_at_stop(r.text or "", stop)
            p, c = int(r.usage.get("prompt_tokens", 0)), int(r.usage.get("completion_tokens", 0))
            gens.append(Generation(text, p, c, "length" if c >= max_new_tokens else "stop"))
        return gens


class ApproxTokenizer:
    """A stand-in when no tokenizer can be loaded for a remote model: ~4 characters per token."""

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **_: Any,
    ) -> Any:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + (
            "<|assistant|>\n" if add_generation_prompt else ""
        )
        return list(range(len(text) // 4 + 1)) if tokenize else text


def _load_tokenizer(name: str) -> Any:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_model(name))
        if getattr(tok, "chat_template", None):
            return tok
    except Exception as e:  # a remote-only model name (gpt-4o-mini), offline, ...
        logger.debug("no tokenizer for %s (%s)", name, e)
    logger.warning(
        "no chat tokenizer for %r; measuring prompts at ~4 characters per token (pass --tokenizer to budget exactly)",
        name,
    )
    return ApproxTokenizer()


def make_engine(name: str, model: str, **options: Any) -> Engine:
    """Build a distiller engine by name, so one config switches between local and served models.

    Args:
        name: ``transformers`` (in process), ``vllm`` (in process, GPU) or ``openai`` (any
            OpenAI-compatible server, e.g. ``vllm serve``).
        model: A Hub id, a local folder or an offline alias (``smollm2-135m-offline``).
        **options: Engine options (``device``, ``base_url``, ``max_concurrency``, ...); those
            that do not apply to the chosen engine are ignored.

    Returns:
        An :class:`Engine`: ``generate(conversations, ...)`` returns one :class:`Generation` each.

    Example:
        >>> engine = make_engine("openai", "my-distiller", base_url="http://127.0.0.1:8000/v1", api_key="sk-local")
        >>> engine.describe()["engine"], engine.describe()["base_url"]
        ('openai', 'http://127.0.0.1:8000/v1')
    """
    import inspect

    classes = {"transformers": TransformersEngine, "vllm": VLLMEngine, "openai": OpenAIEngine}
    if name not in classes:
        raise LmmixupError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    cls = classes[name]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in options.items() if k in accepted and v is not None}
    return cls(model, **kwargs)
