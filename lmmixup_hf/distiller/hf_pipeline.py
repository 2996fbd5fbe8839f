"""``pipeline("instruction-distillation")``: one cluster of related samples in, one fused sample out.

>>> pipe = pipeline("instruction-distillation", model="org/lm-mixup-distiller")
>>> pipe(["Q: what is a tulip\\nA: a flower", "Q: where do tulips come from\\nA: central asia"])
{'instruction': 'Merge the related ...', 'think': '...', 'output': 'Q: ...\\nA: ...', 'prompt': ..., ...}

Inputs: a cluster is ``{"pairs": [...], "task_type": "qa"}`` or a plain list of members, where a
member is a ``"Q: ... A: ..."`` string, a ``(prompt, completion)`` tuple or a
``{"prompt", "completion"}`` dict. A list of clusters (lists or ``{"pairs"}`` dicts) is a batch.

``save_pretrained`` ships this file and the response parser beside it
(:mod:`lmmixup_hf.distiller.response_parsing`, standard library only, imported relatively so that
transformers copies it with the model), so ``pipeline(model=..., trust_remote_code=True)`` works
where ``lmmixup_hf`` is not installed and returns the same output dict for the same reply. The
prompt then comes from the model's ``config.json`` (``lmmixup_prompt``, written on save from
:mod:`lmmixup_hf.distiller.prompts`, the single source of truth); with the package installed its
prompt builder is used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import AutoModelForCausalLM, Pipeline

from .response_parsing import parse_response  # travels with a saved pipeline (a relative import)

TASK = "instruction-distillation"
PROMPT_CONFIG_KEY = "lmmixup_prompt"
STOP = "</answer>"

try:  # the installed package: the one prompt builder
    from lmmixup_hf.distiller import prompts as _prompts
except ImportError:  # loaded from a model folder through trust_remote_code
    _prompts = None


def prompt_spec() -> dict[str, Any]:
    """The prompt as data (saved into the model config so it travels with the weights)."""
    if _prompts is None:
        raise RuntimeError("prompt_spec() needs the lmmixup_hf package")
    return {
        "version": _prompts.PROMPT_VERSION,
        "system": _prompts.SYSTEM_PROMPT,
        "instructions": dict(_prompts.TASK_INSTRUCTIONS),
        "member_template": _prompts.format_member("{prompt}", "{completion}"),
        "separator": _prompts.MEMBER_SEPARATOR,
        "user_template": _prompts.user_content("{instruction}", "{cluster}"),
    }


def _norm(text: Any) -> str:
    return str(text).replace("\r\n", "\n").replace("\r", "\n").strip()


def render_messages(
    spec: Mapping[str, Any], members: Sequence[Any], task_type: str = "qa", instruction: str | None = None
) -> list[dict[str, str]]:
    """Chat messages for a cluster from a saved prompt spec (what ``build_messages`` produces)."""
    parts = []
    for m in members:
        if isinstance(m, str):
            parts.append(m.strip())
        elif isinstance(m, Mapping):
            parts.append(
                spec["member_template"].format(
                    prompt=_norm(m.get("prompt", "")), completion=_norm(m.get("completion", ""))
                )
            )
        elif isinstance(m, Sequence) and len(m) == 2:
            parts.append(spec["member_template"].format(prompt=_norm(m[0]), completion=_norm(m[1])))
        else:
            raise TypeError(f"a cluster member must be a string, a (prompt, completion) pair or a dict, got {m!r}")
    cluster = spec["separator"].join(parts).strip()
    task = str(task_type or "qa").lower().removesuffix("_mixup")
    instruction = (instruction if instruction is not None else spec["instructions"][task]).strip()
    user = (
        spec["user_template"].format(instruction=instruction, cluster=cluster)
        if instruction and cluster
        else instruction or cluster
    )
    return [{"role": "system", "content": spec["system"]}, {"role": "user", "content": user}]


def _is_member(x: Any) -> bool:
    return isinstance(x, (str, tuple)) or (isinstance(x, Mapping) and "pairs" not in x)


class InstructionDistillationPipeline(Pipeline):
    """Fuse a cluster of related, noisy samples into one with an LM-mixup distiller (greedy by
    default; stops at EOS and ``</answer>``)."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tokenizer.padding_side = "left"  # batched generation
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        if isinstance(inputs, (list, tuple)) and inputs and all(_is_member(x) for x in inputs):
            inputs = {"pairs": list(inputs)}  # one cluster
        elif isinstance(inputs, (list, tuple)):
            inputs = [x if isinstance(x, Mapping) else {"pairs": list(x)} for x in inputs]  # a batch
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(
        self, task_type=None, instruction=None, max_prompt_tokens=None, max_new_tokens=None, **generate_kwargs
    ):
        pre = {
            k: v
            for k, v in (
                ("task_type", task_type),
                ("instruction", instruction),
                ("max_prompt_tokens", max_prompt_tokens),
            )
            if v is not None
        }
        fwd = dict(generate_kwargs)
        if max_new_tokens is not None:
            fwd["max_new_tokens"] = max_new_tokens
        return pre, fwd, {}

    def messages_for(
        self, members: Sequence[Any], task_type: str = "qa", instruction: str | None = None
    ) -> list[dict]:
        if _prompts is not None:
            return _prompts.build_messages(_prompts.linearize_cluster(members), task_type, instruction)
        spec = getattr(self.model.config, PROMPT_CONFIG_KEY, None)
        if not spec:
            raise ValueError(f"this model's config has no `{PROMPT_CONFIG_KEY}`; install lmmixup-hf to build prompts")
        return render_messages(spec, members, task_type, instruction)

    def preprocess(
        self, inputs: Any, task_type: str = "qa", instruction: str | None = None, max_prompt_tokens: int = 2400
    ) -> dict[str, Any]:
        if not isinstance(inputs, Mapping) or "pairs" not in inputs:
            raise ValueError(
                'a cluster is {"pairs": [...]} or a list of "Q: .. A: .." strings / (prompt, completion) pairs'
            )
        members = list(inputs["pairs"])
        task_type = inputs.get("task_type") or task_type
        kept = list(members)
        while kept:  # drop whole members from the end until the prompt fits; never cut the template
            messages = self.messages_for(kept, task_type, instruction)
            enc = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            if enc["input_ids"].shape[-1] <= max_prompt_tokens:
                break
            kept.pop()
        if not kept:
            raise ValueError(f"not even one member fits in max_prompt_tokens={max_prompt_tokens}")
        if instruction is None:
            instruction = (
                _prompts.instruction_for(task_type)
                if _prompts is not None
                else self.model.config.lmmixup_prompt["instructions"][str(task_type).lower().removesuffix("_mixup")]
            )
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "task_type": task_type,
            "instruction": instruction,
            "n_dropped": len(members) - len(kept),
        }

    def _forward(self, model_inputs: dict[str, Any], **generate_kwargs: Any) -> dict[str, Any]:
        input_ids, attention_mask = model_inputs.pop("input_ids"), model_inputs.pop("attention_mask")
        kwargs = {
            "max_new_tokens": 512,
            "do_sample": False,
            "temperature": None,
            "top_p": None,
            "top_k": None,
            "stop_strings": [STOP],
            "tokenizer": self.tokenizer,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        kwargs.update(generate_kwargs)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return {"generated": out[:, input_ids.shape[1] :], **model_inputs}

    def postprocess(self, model_outputs: dict[str, Any]) -> dict[str, Any]:
        ids = model_outputs["generated"][0]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        m = re.search(re.escape(STOP), text, re.I)
        text = text[: m.end()] if m else text
        task_type = model_outputs["task_type"]
        task_type = task_type[0] if isinstance(task_type, list) else task_type
        instruction = model_outputs["instruction"]
        instruction = instruction[0] if isinstance(instruction, list) else instruction
        n_dropped = model_outputs["n_dropped"]
        parsed = parse_response(text, task_type)
        return {
            "instruction": instruction,
            "think": parsed.think,
            "output": parsed.output,
            "prompt": parsed.prompt,
            "completion": parsed.completion,
            "parse_error": parsed.error,
            "raw_response": text,
            "n_dropped": int(n_dropped[0] if isinstance(n_dropped, list) else n_dropped),
        }

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Save model, tokenizer and this file; the prompt goes into the config so the saved folder
        works with ``trust_remote_code`` and no lmmixup_hf."""
        if _prompts is not None:
            setattr(self.model.config, PROMPT_CONFIG_KEY, prompt_spec())
        super().save_pretrained(save_directory, **kwargs)


def register() -> None:
    """Make ``pipeline("instruction-distillation", model=...)`` work (called on ``import lmmixup_hf``)."""
    from transformers.pipelines import PIPELINE_REGISTRY

    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=InstructionDistillationPipeline, pt_model=AutoModelForCausalLM, type="text"
        )


if __name__ == "lmmixup_hf.distiller.hf_pipeline":  # imported from the package, not as a saved pipeline's remote code
    register()
