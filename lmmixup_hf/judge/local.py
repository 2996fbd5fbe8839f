"""A local transformers model as judge: scores read off the next-token distribution."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lmmixup_hf.data.schema import RAW_MAX, RAW_MIN
from lmmixup_hf.judge.parsing import Rating, make_rating
from lmmixup_hf.judge.rubric import DIMENSIONS, LOCAL_REFERENCE_KEYS, JudgeItem, build_judge_messages, rubric_kind
from lmmixup_hf.models.llm_client import usage_bar


class _LocalUsage:
    """Usage counters shaped like :class:`~lmmixup_hf.models.llm_client.UsageMeter` (cost is always 0)."""

    def __init__(self, model: str):
        self.model, self.n_requests, self.prompt_tokens = model, 0, 0
        self.n_cached = self.n_failed = self.completion_tokens = 0
        self.cost_usd = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "n_requests": self.n_requests,
            "prompt_tokens": self.prompt_tokens,
            "cost_usd": 0.0,
        }


_ITEM_MARK = "\u241fITEM\u241f"  # stands for the item text when the shared prompt prefix is cut out


class LocalJudge:
    """A transformers model as judge, with no server. Each dimension is read off the next-token
    distribution restricted to the score tokens "1".."10" (teacher-forcing the JSON keys), so every
    item gets a valid score; the overall's expected value is recorded as ``expected``.

    The prompt is a long rubric (system turn, scale, checks, format: ~280 tokens) followed by a
    short item. With ``prefix_cache`` (default) the rubric is encoded once per rubric kind and its
    KV cache is shared by every row, so a row costs only its own tokens; rows are batched by rubric
    and length to keep padding small. The scores are those of the full prompt (a test checks
    equality with ``prefix_cache=False``, which encodes every prompt whole)."""

    def __init__(
        self,
        model: str = "smollm2-135m-offline",
        *,
        device: str | None = None,
        batch_size: int = 8,
        max_item_tokens: int = 768,
        prefix_cache: bool = True,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lmmixup_hf.models.registry import resolve_model

        path = resolve_model(model)
        self.name = f"local:{model}"
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path).to(self.device).eval()
        self._cache_arg = _cache_arg(self.model)
        self.batch_size = batch_size
        self.max_item_tokens = max_item_tokens
        self.prefix_cache = prefix_cache
        self._prefixes: dict[tuple[str, str, bool], tuple[list[int], Any]] = {}
        self.usage = _LocalUsage(model)
        ids, values = [], []
        for v in range(RAW_MIN, RAW_MAX + 1):
            tok = self.tokenizer.encode(str(v), add_special_tokens=False)
            if len(tok) == 1:  # "10" is two tokens in many vocabularies; then the scale is 1-9
                ids.append(tok[0])
                values.append(v)
        if not ids:
            raise ValueError(f"{model}: the tokenizer has no single-token digits to score with")
        self.score_ids = torch.tensor(ids)
        self.score_values = torch.tensor(values, dtype=torch.float32)

    def flush(self) -> None:
        """Nothing is buffered: a local judge keeps no reply cache."""

    def _truncate(self, text: str) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= self.max_item_tokens:
            return text
        return self.tokenizer.decode(ids[: self.max_item_tokens]) + " [...]"

    def _prompt(self, item: JudgeItem) -> str:
        item = JudgeItem(
            self._truncate(item.text),
            item.kind,
            self._truncate(item.reference) if item.reference else None,
            item.style,
        )
        return self.tokenizer.apply_chat_template(
            build_judge_messages(item), tokenize=False, add_generation_prompt=True
        )

    def _prefix(self, item: JudgeItem) -> tuple[list[int], Any]:
        """The token ids of the prompt up to the item text for this rubric, and their KV cache
        (computed once per rubric kind, reference setting and style)."""
        import torch

        kind = item.kind if item.style == "reference" else rubric_kind(item.kind)
        key = (item.style, kind, bool(item.reference))
        if key not in self._prefixes:
            marked = JudgeItem(_ITEM_MARK, kind, _ITEM_MARK if item.reference else None, style=item.style)
            text = self.tokenizer.apply_chat_template(
                build_judge_messages(marked), tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer.encode(text.split(_ITEM_MARK)[0], add_special_tokens=False)
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
            self.usage.n_requests += 1
            self.usage.prompt_tokens += len(ids)
            self._prefixes[key] = (ids, _cache_of(out))
        return self._prefixes[key]

    def _score_batch(
        self, prompts: list[str], prefix: tuple[list[int], Any] | None = None, style: str = "ours"
    ) -> list[tuple[dict[str, int], float, str]]:
        """One forward pass over the prompts, then one short cached step per further dimension:
        ``{"rarity": `` -> pick -> ``7, "complexity": `` -> pick -> ... The picked value is the most
        likely score token; for the overall we also keep the expected value. The reference style
        forces its own keys (``"Rarity"`` ... ``"Overall rating"``).

        With ``prefix`` (ids and KV cache that every prompt starts with), only the rest of each
        prompt is encoded, left-padded after the shared prefix."""
        import copy

        import torch

        keys = dict(zip(DIMENSIONS, LOCAL_REFERENCE_KEYS if style == "reference" else DIMENSIONS, strict=True))
        tok = self.tokenizer
        n = len(prompts)
        dims: list[dict[str, int]] = [{} for _ in prompts]
        replies = ["{" for _ in prompts]
        expected = [0.0] * n
        texts = [p + '{"' + keys[DIMENSIONS[0]] + '": ' for p in prompts]
        if prefix is None:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            input_ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            past = None
        else:
            head, cache = prefix
            rest = [tok.encode(t, add_special_tokens=False)[len(head) :] for t in texts]
            width = max(len(r) for r in rest)
            pad = tok.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rest], device=self.device)
            own = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rest], device=self.device)
            mask = torch.cat([torch.ones((n, len(head)), dtype=own.dtype, device=self.device), own], dim=1)
            positions = len(head) + (own.cumsum(-1) - 1).clamp(min=0)
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(n)
        score_ids = self.score_ids.to(self.device)
        for j, dim in enumerate(DIMENSIONS):
            with torch.inference_mode():
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    **{self._cache_arg: past},
                )
            past = _cache_of(out)
            self.usage.n_requests += 1
            self.usage.prompt_tokens += int(input_ids.numel())
            probs = torch.softmax(out.logits[:, -1, :].float()[:, score_ids], dim=-1).cpu()
            best = probs.argmax(dim=-1)
            for r in range(n):
                value = int(self.score_values[best[r]])
                dims[r][dim] = value
                replies[r] += f'"{keys[dim]}": {value}' + (", " if j < len(DIMENSIONS) - 1 else "}")
                if dim == "overall":
                    expected[r] = round(float((probs[r] * self.score_values).sum()), 4)
            if j == len(DIMENSIONS) - 1:
                break
            # teacher-force the picked value and the next key; the same suffix length for every row
            suffix = tok.encode(f', "{keys[DIMENSIONS[j + 1]]}": ', add_special_tokens=False)
            step = torch.tensor([[int(self.score_ids[best[r]]), *suffix] for r in range(n)], device=self.device)
            positions = positions[:, -1:] + torch.arange(1, step.shape[1] + 1, device=self.device)
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            input_ids = step
        return [(d, e, rep) for d, e, rep in zip(dims, expected, replies, strict=True)]

    def rate_many(
        self,
        items: Sequence[JudgeItem],
        *,
        on_result: Callable[[int, Rating], None] | None = None,
        desc: str = "rating",
        show_progress: bool = True,
    ) -> list[Rating]:
        out: list[Rating | None] = [None] * len(items)
        prompts = [self._prompt(it) for it in items]
        batches = self._batches(items, prompts)
        with usage_bar(len(items), desc, self.usage, disable=not show_progress) as progress:  # type: ignore[arg-type]
            for rows, prefix, style in batches:
                scored = self._score_batch([prompts[i] for i in rows], prefix, style)
                for i, (dims, exp, reply) in zip(rows, scored, strict=True):
                    rating = out[i] = make_rating(dims, self.name, reply, exp)
                    if on_result is not None:
                        on_result(i, rating)
                    progress()
        return out  # type: ignore[return-value]

    def _batches(self, items: Sequence[JudgeItem], prompts: list[str]) -> list[tuple[list[int], Any, str]]:
        """Row batches of one rubric style, each with the prefix its prompts share (None: encode
        whole prompts).

        With the prefix cache, rows are grouped by rubric and sorted by length, so that a batch
        pads little; a prompt that does not tokenise to its rubric's prefix (a tokenizer merging
        across the boundary) is encoded whole, so the scores never depend on the shortcut."""
        groups: dict[tuple[str, tuple[int, ...] | None], list[tuple[int, int]]] = {}
        prefixes: dict[tuple[int, ...], Any] = {}
        for i, item in enumerate(items):
            if not self.prefix_cache:
                groups.setdefault((item.style, None), []).append((i, i))  # input order
                continue
            head, cache = self._prefix(item)
            first = LOCAL_REFERENCE_KEYS[0] if item.style == "reference" else DIMENSIONS[0]
            ids = self.tokenizer.encode(prompts[i] + '{"' + first + '": ', add_special_tokens=False)
            key = tuple(head) if ids[: len(head)] == head and len(ids) > len(head) else None
            if key is not None:
                prefixes[key] = (head, cache)
            groups.setdefault((item.style, key), []).append((len(ids), i))
        out = []
        for (style, key), rows in groups.items():
            rows.sort()
            for s in range(0, len(rows), self.batch_size):
                batch = [i for _, i in rows[s : s + self.batch_size]]
                out.append((batch, None if key is None else prefixes[key], style))
        return out


def _cache_arg(model: Any) -> str:
    """The forward argument that takes the KV cache: ``cache`` in newer transformers, where
    ``past_key_values`` is deprecated, else ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    """The KV cache a forward returned, under either name."""
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")
