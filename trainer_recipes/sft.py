"""Cold-start SFT of the distiller on MIXTURE (prompt-completion, prompt masked, end-of-turn trained).

    accelerate launch --config_file trainer_recipes/accelerate/zero2.yaml \
        trainer_recipes/sft.py --config trainer_recipes/configs/qwen2.5-1.5b/sft.yaml
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from lmmixup_hf.models.registry import resolve_model
from lmmixup_hf.training.data import cap_prompts, load_records, to_sft_dataset

logger = logging.getLogger(__name__)


@dataclass
class SFTScriptArguments(ScriptArguments):
    data_dir: str | None = field(
        default=None, metadata={"help": "Local MIXTURE mirror for load_dataset('mixture', ...)."}
    )
    task_type: str | None = field(default=None, metadata={"help": "Task of records without task_type/source."})
    max_prompt_tokens: int = field(default=2400, metadata={"help": "Prompt cap in tokens (0: none)."})
    overlong: str = field(default="truncate", metadata={"help": "Over the cap: truncate (drop members) or drop."})
    prompt_style: str = field(
        default="ours",
        metadata={
            "help": "ours, or reference: the paper's prompts, to continue from a checkpoint trained by its code."
        },
    )


def main(script_args: SFTScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_path = resolve_model(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    records = load_records(
        script_args.dataset_name, script_args.dataset_config, script_args.data_dir, script_args.dataset_train_split
    )
    dataset = cap_prompts(
        to_sft_dataset(records, script_args.task_type, script_args.prompt_style),
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
    trainer = SFTTrainer(
        model=model_path,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"SFT done: {len(dataset)} rows, model saved to {training_args.output_dir}")


if __name__ == "__main__":
    parser = TrlParser((SFTScriptArguments, SFTConfig, ModelConfig))
    main(*parser.parse_args_and_config())
