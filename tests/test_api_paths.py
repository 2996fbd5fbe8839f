"""Every name the docs import, and every name the split modules exported, imports from its documented path."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
FROM_IMPORT = re.compile(r"^\s*from (lmmixup_hf[\w.]*) import ([\w, ]+)", re.M)
DOTTED = re.compile(r"`(lmmixup_hf(?:\.\w+)+)")


def documented() -> set[tuple[str, str | None]]:
    """(module, name) for every ``from lmmixup_hf... import ...`` line and every `lmmixup_hf.x.y`
    reference in the docs (name None: the whole dotted path is to be resolved)."""
    out: set[tuple[str, str | None]] = set()
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for module, names in FROM_IMPORT.findall(text):
            out |= {(module, n.strip()) for n in names.split(",") if n.strip()}
        out |= {(dotted, None) for dotted in DOTTED.findall(text)}
    return out


def resolve(dotted: str) -> object:
    """A module, or an attribute of the longest importable module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_docs_name_something():
    names = documented()
    assert ("lmmixup_hf.judge.judges", "make_judge") in names and len(names) > 20


@pytest.mark.parametrize("module, name", sorted(documented(), key=str))
def test_documented_name_imports(module, name):
    obj = resolve(module if name is None else f"{module}.{name}")
    assert obj is not None


# the public names of the modules split into smaller ones: each stays importable from the old path
SPLIT = {
    "lmmixup_hf.judge.judges": "DIMENSIONS JUDGE_SYSTEM JudgeItem KINDS LOCAL_REFERENCE_KEYS LocalJudge OpenAIJudge "
    "REFERENCE_RUBRICS RUBRICS RUBRIC_VERSION Rating ReplyParseError STYLES build_judge_messages expected_score "
    "make_judge make_rating parse_reply parse_reply_for parse_reply_reference reference_kind reference_rubric_prompt "
    "rubric_kind",
    "lmmixup_hf.models.llm_client": "APIStatusFailure BATCH_DISCOUNT ChatClient ChatResult DEFAULT_PRICES "
    "ResponseCache TokenBucket UsageMeter batch_price_for map_bounded price_for request_key run_sync usage_bar",
    "lmmixup_hf.stages.cluster": "ClusterOptions ClusterResult ClusteredRows LEFTOVER SourceMapper "
    "assign balanced_step candidate_centres capacity_cluster cell_neighbors cluster_rows cluster_sources "
    "cluster_subset cohesion compact_labels data_cluster propose_rounds refine_swaps sample_caps size_penalty "
    "two_level_centres",
    "lmmixup_hf.pipeline.report": "Example PLOTS ReportArgs STAGES STAGE_HEADER StageSummary TEMPLATE "
    "collect_examples count_rows find_costs plot_counts plot_hist plot_scores plot_time read_manifest read_table "
    "rejection_reasons render report scores summarize",
    "lmmixup_hf.embed.neighbors": "AUTO_MIN_KEYS AnnCheck Backend MAX_SCORE_ERROR MIN_RECALL Partition ann_search "
    "Measure build_ann build_partition checked_knn knn partition_search refine_self resolve_device set_effort",
    "lmmixup_hf.pipeline.rate": "CHECKPOINT Checkpoint FAILED REPLY_TOKENS RateArgs estimate_cost rate summarize "
    "write_summary",
}


@pytest.mark.parametrize("module", sorted(SPLIT))
def test_split_modules_keep_their_names(module):
    mod = importlib.import_module(module)
    missing = [name for name in SPLIT[module].split() if not hasattr(mod, name)]
    assert not missing, f"{module} lost {missing}"
