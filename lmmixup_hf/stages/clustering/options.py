"""The clustering options, on their own so that the algorithms (``drawn``, ``linkage``) read their
defaults from them: each default is written once, here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmmixup_hf.options import OptionError, Options, check_order


@dataclass
class ClusterOptions(Options):
    """The clustering options (``lmmixup cluster`` takes the same ones as flags; its arguments
    dataclass extends this one, so each default is written here only)."""

    sizes: Literal["data", "drawn"] = field(
        default="data",
        metadata={
            "help": "`data`: sizes follow the data (merge while the mean pairwise cosine stays >= min_cohesion; "
            "rows with no close neighbours are distilled alone); `drawn`: the method's sizes drawn from "
            "Normal(mean_cap, std_cap), every row placed."
        },
    )
    min_size: int = field(default=2, metadata={"help": "Smallest cluster.", "range": "[1, inf)"})
    max_size: int = field(default=25, metadata={"help": "Largest cluster.", "range": "[1, inf)"})
    mean_cap: float = field(
        default=10.0,
        metadata={
            "help": "Mean cluster size: the drawn sizes' Normal, or the data sizes' prior.",
            "range": "(0, inf)",
        },
    )
    std_cap: float = field(
        default=3.0, metadata={"help": "Std of the drawn sizes / of the data sizes' prior.", "range": "[0, inf)"}
    )
    min_cohesion: float = field(
        default=0.6,
        metadata={"help": "data: every cluster's mean pairwise cosine is at least this.", "range": "[-1, 1]"},
    )
    size_prior: float = field(
        default=0.02,
        metadata={
            "help": "data: extra mean cosine a cluster needs per std_cap above mean_cap (0 = no prior).",
            "range": "[0, inf)",
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed for sizes and k-means.", "range": "[0, inf)"})
    sim_floor: float | None = field(
        default=None,
        metadata={
            "help": "drawn: minimum cosine to a cluster centre; points below go to leftovers/.",
            "range": "[-1, 1]",
        },
    )
    n_candidates: int = field(
        default=8, metadata={"help": "drawn: candidate centres per point (top-m).", "range": "[1, inf)"}
    )
    cell_size: int = field(default=512, metadata={"help": "Points per coarse k-means cell.", "range": "[1, inf)"})
    kmeans_iters: int = field(default=5, metadata={"help": "k-means iterations per level.", "range": "[0, inf)"})
    balance_iters: int = field(
        default=2,
        metadata={
            "help": "drawn: balanced k-means steps (centres := member means, reassign; 0 = off).",
            "range": "[0, inf)",
        },
    )
    refine_rounds: int = field(
        default=2, metadata={"help": "drawn: size-preserving swap rounds (0 = off).", "range": "[0, inf)"}
    )
    device: str | None = field(
        default=None,
        metadata={
            "help": "Device for k-means and kNN (default: cuda > cpu); `lmmixup cluster` embeds on it too "
            "(default: cuda > mps > cpu).",
            "fingerprint": False,
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_order(self, "min_size", "max_size")
        if self.sizes == "data" and self.sim_floor is not None:
            raise OptionError("sim_floor", "applies to sizes drawn only; data sizes use min_cohesion", self.sim_floor)
