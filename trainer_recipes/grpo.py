"""GRPO of the distiller on MIXTURE with the LM-mixup rewards (quality, alignment, format).

    accelerate launch --config_file trainer_recipes/accelerate/zero2.yaml \
        trainer_recipes/grpo.py --config trainer_recipes/configs/qwen2.5-1.5b/grpo.yaml
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field

from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, ModelConfig, ScriptArguments, TrlParser, get_peft_config

from lmmixup_hf.models.registry import resolve_model
from lmmixup_hf.rewards import RewardConfig
from lmmixup_hf.training.data import cap_prompts, load_records, to_grpo_dataset

logger = logging.getLogger(__name__)

DEFAULT_REWARDS = [
    "lmmixup_hf.rewards.quality_reward",
    "lmmixup_hf.rewards.alignment_reward",
    "lmmixup_hf.rewards.format_reward",
]


@dataclass
class GRPOScriptArguments(ScriptArguments):
    data_dir: str | None = field(
        default=None, metadata={"help": "Local MIXTURE mirror for load_dataset('mixture', ...)."}
    )
    task_type: str | None = field(default=None, metadata={"help": "Task of records without task_type."})
    reward_funcs: list[str] = field(
        default_factory=lambda: list(DEFAULT_REWARDS),
        metadata={"help": "Reward functions by dotted path (or a name in lmmixup_hf.rewards)."},
    )
    reward_mode: str | None = field(
        default=None, metadata={"help": "reference | smooth (default: $LMMIXUP_REWARD_MODE or reference)."}
    )
    quality_library: str | None = field(
        default=None, metadata={"help": "Folder from `lmmixup build-quality-library`."}
    )
    embedding_model: str | None = field(
        default=None, metadata={"help": "Embedding model of quality/alignment (default: BAAI/bge-m3)."}
    )
    max_prompt_tokens: int = field(default=2400, metadata={"help": "Prompt cap in tokens (GRPO has none; 0: none)."})
    overlong: str = field(default="truncate", metadata={"help": "Over the cap: truncate (drop members) or drop."})
    prompt_style: str = field(
        default="ours",
        metadata={
            "help": "ours, or reference: the paper's prompts, to continue from a checkpoint trained by its code."
        },
    )


def resolve_reward(path: str):
    """``pkg.module.func`` by import, or a bare name exported by :mod:`lmmixup_hf.rewards`."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module or "lmmixup_hf.rewards"), name)


def main(script_args: GRPOScriptArguments, training_args: GRPOConfig, model_args: ModelConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The module-level rewards read their settings from the environment (also in worker processes).
    overrides = {
        "mode": script_args.reward_mode,
        "library": script_args.quality_library,
        "embedding_model": script_args.embedding_model,
    }
    os.environ.update(RewardConfig.from_env(**{k: v for k, v in overrides.items() if v}).to_env())
    reward_funcs = [resolve_reward(p) for p in script_args.reward_funcs]
    logger.info("rewards: %s, weights %s", [f.__name__ for f in reward_funcs], training_args.reward_weights)

    model_path = resolve_model(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    records = load_records(
        script_args.dataset_name, script_args.dataset_config, script_args.data_dir, script_args.dataset_train_split
    )
    dataset = cap_prompts(
        to_grpo_dataset(records, script_args.task_type, script_args.prompt_style),
        tokenizer,
        script_args.max_prompt_tokens,
        script_args.overlong,
    )
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    trainer = GRPOTrainer(
        model=model_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"GRPO done: {len(dataset)} prompts, model saved to {training_args.output_dir}")


if __name__ == "__main__":
    parser = TrlParser((GRPOScriptArguments, GRPOConfig, ModelConfig))
    main(*parser.parse_args_and_config())
