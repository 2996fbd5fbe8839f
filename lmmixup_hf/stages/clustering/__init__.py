"""The two clustering algorithms of the cluster stage (``lmmixup_hf.stages.cluster``): ``drawn``
(sampled capacities, a capacity-constrained assignment) and ``linkage`` (data-driven sizes,
size-capped average linkage), over the pieces they share in ``common``, with their defaults read
from the options in ``options``."""
