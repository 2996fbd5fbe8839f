"""Hub cards and transfer: a model card for a distiller, dataset cards for the data we produce,
``lmmixup push`` / ``lmmixup pull``.

The token comes only from the environment (``HF_TOKEN`` or the login that ``hf auth login``
stored); it is never a flag, never logged and never written into a card or manifest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, HfApi, ModelCard, ModelCardData

from lmmixup_hf.data.schema import LmmixupError, ServiceError
from lmmixup_hf.options import Options

logger = logging.getLogger(__name__)

MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

An **LM-mixup distiller**: given a cluster of related, low-quality instruction samples it writes one
fused, high-quality sample, with its reasoning in `<think>` and the sample in `<answer>`.

## Method
{{ method }}

## Training data
{{ data }}

## Rewards
{{ rewards }}

## Evaluation
{{ eval_table }}

## How to use

```python
from transformers import pipeline

pipe = pipeline("instruction-distillation", model="{{ repo_id }}", trust_remote_code=True)
pipe(["Q: what is a tulip\\nA: a flower", "Q: where do tulips come from\\nA: central asia"])
# -> {"instruction": ..., "think": ..., "output": "Q: ...\\nA: ...", "prompt": ..., "completion": ...}
```

With `lmmixup-hf` installed, `trust_remote_code` is not needed, and `lmmixup distill --model
{{ repo_id }}` runs it over a whole clustered pool.

## Intended use
{{ intended_use }}

## Limitations
{{ limitations }}
"""

DEFAULT_METHOD = (
    "Low-quality samples of an instruction pool are clustered by meaning; each cluster is written out as "
    "`Q: ...` / `A: ...` members and the model fuses it into one sample of the cluster's task type (qa, mcq, "
    "tfq, cs, para). The model is trained with a cold-start SFT on MIXTURE followed by GRPO."
)
DEFAULT_REWARDS = (
    "- **quality**: a Bayesian kNN estimate of the fused sample's quality against a rated embedding library;\n"
    "- **alignment**: cosine similarity between the fused sample and the reference target;\n"
    "- **format**: `<think>`/`<answer>` structure plus the task type's answer pattern."
)
DEFAULT_INTENDED_USE = (
    "Augmenting instruction-tuning pools: turning clusters of noisy, partial or redundant samples into fewer, "
    "better ones before fine-tuning. Its outputs should be re-rated and filtered before training on them."
)
DEFAULT_LIMITATIONS = (
    "- Fused samples can contain facts that none of the members stated; re-rate and filter them.\n"
    "- Trained on English, Wikipedia-based data; other languages and domains are untested.\n"
    "- Over-long clusters lose whole members to the prompt budget.\n"
    "- Model quality depends on the base model and the judge used to rate the training data."
)


def _eval_results(
    results: Mapping[str, Mapping[str, float]], dataset_types: Mapping[str, str] | None
) -> list[EvalResult]:
    out = []
    for bench, metrics in results.items():
        for metric, value in metrics.items():
            out.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=(dataset_types or {}).get(bench, bench),
                    dataset_name=bench,
                    metric_type=metric,
                    metric_value=float(value),
                )
            )
    return out


def _eval_table(results: Mapping[str, Mapping[str, float]]) -> str:
    if not results:
        return "No evaluation results recorded yet."
    rows = ["| benchmark | metric | value |", "| --- | --- | --- |"]
    rows += [f"| {b} | {m} | {v:.4g} |" for b, ms in results.items() for m, v in ms.items()]
    return "\n".join(rows)


def model_card(
    model_name: str,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] = (),
    eval_results: Mapping[str, Mapping[str, float]] | None = None,
    dataset_types: Mapping[str, str] | None = None,
    license: str = "apache-2.0",
    method: str = DEFAULT_METHOD,
    data: str | None = None,
    rewards: str = DEFAULT_REWARDS,
    intended_use: str = DEFAULT_INTENDED_USE,
    limitations: str = DEFAULT_LIMITATIONS,
) -> ModelCard:
    """A model card with ``model-index`` results: ``eval_results={"MMLU": {"acc": 0.51}, ...}``."""
    results = dict(eval_results or {})
    card_data = ModelCardData(
        language="en",
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["lm-mixup", "instruction-distillation", "data-augmentation", "trl", "grpo"],
        base_model=base_model,
        datasets=list(datasets) or None,
        model_name=model_name,
        eval_results=_eval_results(results, dataset_types) or None,
    )
    data = data or (
        "Trained on " + ", ".join(f"`{d}`" for d in datasets) + "." if datasets else "See the training run."
    )
    return ModelCard.from_template(
        card_data,
        template_str=MODEL_CARD_TEMPLATE,
        model_name=model_name,
        repo_id=repo_id or model_name,
        method=method,
        data=data,
        rewards=rewards,
        eval_table=_eval_table(results),
        intended_use=intended_use,
        limitations=limitations,
    )


DATASET_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ pretty_name }}

{{ description }}

## Splits

{{ splits_table }}

## Columns

{{ columns_table }}

## Provenance

Produced by `lmmixup {{ stage }}` (lmmixup-hf). Parameters and input fingerprints:

```json
{{ provenance }}
```

## Loading

```python
from datasets import load_dataset

ds = load_dataset("{{ repo_id }}", "{{ default_config }}", split="train")
```
"""

STAGE_DESCRIPTIONS = {
    "distill": "Samples fused from clusters of low-quality instruction data by an LM-mixup distiller. Each row "
    "keeps the cluster it came from (`cluster_id`, `member_ids`, `input`), the distiller's reasoning "
    "(`think`), its raw response, and the fused sample as `output` and as a `prompt`/`completion` pair.",
    "rate": "Instruction samples rated by an LLM judge (raw 1-10, compressed 0-5).",
    "cluster": "Low-quality instruction samples grouped into clusters of related items.",
    "mix": "Original high-quality samples mixed with distilled samples.",
}
COLUMN_DOCS = {
    "id": "stable row id",
    "prompt": "instruction",
    "completion": "answer",
    "source": "subset of origin",
    "task_type": "qa, mcq, tfq, cs or para",
    "cluster_id": "cluster the row came from",
    "member_ids": "ids of the cluster members the distiller saw",
    "instruction": "task instruction given to the distiller",
    "input": "the linearised cluster",
    "think": "the distiller's reasoning",
    "output": "the fused sample",
    "raw_response": "the distiller's full response",
    "parse_ok": "the response had the task's format",
    "parse_error": "why it did not",
    "rating": "judge rating",
    "long_tail": "kNN rarity score",
}


def dataset_card(
    stage_dir: str | Path, repo_id: str, pretty_name: str | None = None, license: str = "apache-2.0"
) -> DatasetCard:
    """A dataset card for a stage output folder: one config per split folder (``data``, ``high``,
    ``unparsed``, ...), the columns, row counts and the manifest's provenance."""
    import pyarrow.parquet as pq

    stage_dir = Path(stage_dir)
    manifest = json.loads((stage_dir / "manifest.json").read_text()) if (stage_dir / "manifest.json").exists() else {}
    splits = sorted(
        p.name for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and any(p.glob("*.parquet"))
    )
    if not splits:
        raise LmmixupError(f"{stage_dir}: no <split>/*.parquet folders to describe")
    configs, rows, schema = [], [], None
    for name in splits:
        files = sorted((stage_dir / name).glob("*.parquet"))
        n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        config = "default" if name == "data" else name
        configs.append(
            {
                "config_name": config,
                "data_files": [{"split": "train", "path": f"{name}/*.parquet"}],
                **({"default": True} if name == "data" else {}),
            }
        )
        rows.append(f"| `{config}` | `{name}/` | {n} |")
        if schema is None or name == "data":
            schema = pq.read_schema(files[0])
    stage = manifest.get("stage", "pipeline")
    card_data = DatasetCardData(
        license=license,
        language="en",
        pretty_name=pretty_name or repo_id.split("/")[-1],
        tags=["lm-mixup", "synthetic", "instruction-tuning"],
        configs=configs,
        task_categories=["text-generation"],
    )
    columns = ["| column | type | meaning |", "| --- | --- | --- |"]
    columns += [f"| `{f.name}` | {f.type} | {COLUMN_DOCS.get(f.name, '')} |" for f in schema]
    provenance = {
        k: manifest[k] for k in ("stage", "fingerprint", "inputs", "params", "counts", "throughput") if k in manifest
    }
    return DatasetCard.from_template(
        card_data,
        template_str=DATASET_CARD_TEMPLATE,
        pretty_name=card_data.pretty_name,
        description=STAGE_DESCRIPTIONS.get(stage, "Data produced by the LM-mixup pipeline."),
        splits_table="\n".join(["| config | folder | rows |", "| --- | --- | --- |", *rows]),
        columns_table="\n".join(columns),
        stage=stage,
        provenance=json.dumps(provenance, indent=2, default=str),
        repo_id=repo_id,
        default_config="default" if "data" in splits else configs[0]["config_name"],
    )


# -- push / pull ------------------------------------------------------------------------------
@dataclass
class PushArgs(Options):
    repo_id: str = field(metadata={"help": "Target repo, e.g. org/lm-mixup-distiller."})
    model_dir: str | None = field(default=None, metadata={"help": "A saved model/pipeline folder to push."})
    dataset_dir: str | None = field(default=None, metadata={"help": "A stage output folder (data/*.parquet) to push."})
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message."})
    write_card: bool = field(default=True, metadata={"help": "Write README.md (model or dataset card) if missing."})


@dataclass
class PullArgs(Options):
    repo_id: str = field(metadata={"help": "Repo to download."})
    out: str = field(metadata={"help": "Local folder."})
    repo_type: Literal["model", "dataset"] = field(default="model", metadata={"help": "model or dataset."})
    revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit."})


_DATASET_IGNORE = [".work/**", ".*", "**/.*"]


def push(args: PushArgs, api: HfApi | None = None) -> str:
    """Create the repo if needed and upload the folder with a card, in one commit; returns the
    commit URL. The card is generated in memory: the user's folder is never written to."""
    from huggingface_hub import CommitOperationAdd, get_token
    from huggingface_hub.utils import filter_repo_objects

    if bool(args.model_dir) == bool(args.dataset_dir):
        raise LmmixupError("give exactly one of --model_dir or --dataset_dir")
    repo_type = "model" if args.model_dir else "dataset"
    folder = Path(args.model_dir or args.dataset_dir)
    if not folder.is_dir():
        raise LmmixupError(f"{folder}: no such folder")
    if api is None and not get_token():  # before any work: a push cannot go anywhere without one
        raise LmmixupError("pushing needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = api or HfApi()  # token: HF_TOKEN or the stored login, resolved by huggingface_hub
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files = list(filter_repo_objects(files, ignore_patterns=_DATASET_IGNORE))
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
    if args.write_card and "README.md" not in files:
        card = (
            model_card(folder.name, repo_id=args.repo_id)
            if repo_type == "model"
            else dataset_card(folder, args.repo_id)
        )
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    with _hub_errors(args.repo_id):
        api.create_repo(args.repo_id, repo_type=repo_type, private=args.private, exist_ok=True)
        info = api.create_commit(
            repo_id=args.repo_id,
            repo_type=repo_type,
            operations=operations,
            commit_message=args.commit_message or f"Upload {repo_type} with lmmixup-hf",
        )
    url = getattr(info, "commit_url", str(info))
    logger.info("pushed %s to %s (%s)", folder, args.repo_id, url)
    return url


def pull(args: PullArgs, api: HfApi | None = None) -> str:
    """Download a repo snapshot into ``out``; returns the local path."""
    api = api or HfApi()
    with _hub_errors(args.repo_id):
        path = api.snapshot_download(
            args.repo_id, repo_type=args.repo_type, revision=args.revision, local_dir=args.out
        )
    logger.info("pulled %s into %s", args.repo_id, path)
    return str(path)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The transport errors of the HTTP library under huggingface_hub, by their own base class:
    ``httpx2``/``httpx`` errors are not ``OSError`` (``requests``' are). Whichever is installed."""
    import importlib

    errors: list[type[BaseException]] = [OSError, ConnectionError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


@contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    """Offline, unreachable, unauthorised, missing: one line that says which, never a traceback."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        yield
    except OfflineModeIsEnabled:
        raise ServiceError(f"{repo_id}: the Hub is switched off here (HF_HUB_OFFLINE=1)") from None
    except RepositoryNotFoundError:
        raise ServiceError(f"{repo_id}: no such repository, or the token may not see it") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = " (check HF_TOKEN: it may lack write access)" if status in (401, 403) else ""
        raise ServiceError(f"{repo_id}: the Hub refused the request (HTTP {status}){hint}") from None
    except _transport_errors() as e:  # evaluated only when something was raised
        raise ServiceError(
            f"{repo_id}: could not reach the Hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
