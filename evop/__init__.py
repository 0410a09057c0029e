"""EvoP: robust LLM inference via evolutionary pruning of whole decoder layers.

The library: :mod:`evop.config` (one typed configuration), :mod:`evop.patterns` (what is removed),
:mod:`evop.calibration` (CCDS), :mod:`evop.search` (EPPS, the genetic algorithm),
:mod:`evop.fitness` (scoring a pattern in place), :mod:`evop.models` (layer access per family),
:mod:`evop.pruning` (saving the pruned checkpoint), :mod:`evop.assets` (offline demo assets).
It never imports Prefect; ``tasks/`` and ``flows/`` wrap it.
"""

__version__ = "0.1.0"
