"""EvoP: robust LLM inference via evolutionary pruning of whole decoder layers.

The library: :mod:`evop.config` (one typed configuration), :mod:`evop.method` (the method: patterns,
CCDS, EPPS, fitness), :mod:`evop.baselines` and :mod:`evop.searches` (the methods it is compared
with; every method by name), :mod:`evop.models` (loading, layer access per family, the pruned
checkpoint), :mod:`evop.eval` (perplexity, lm-eval, speed, comparisons), :mod:`evop.storage`
(checkpoints, MLflow), :mod:`evop.assets` (offline demo assets) and :mod:`evop.pipeline` (the
pipeline's steps). It never imports Prefect; ``tasks/`` and ``flows/`` wrap it (only
:mod:`evop.pipeline.launcher` starts that flow, for ``evop run``).
"""

__version__ = "0.1.0"
