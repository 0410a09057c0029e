"""EvoP's method: CCDS calibration and EPPS, the evolutionary search over pruning patterns.

Modules:

- ``patterns``: :class:`~evop.method.patterns.Pattern` (the removed layers) and the checks of ``k``.
- ``operators``: EPPS's variation operators (random patterns, crossover, swap mutation).
- ``state``: :class:`~evop.method.state.SearchState`, a search's resumable state as strict JSON.
- ``genetic``: :class:`~evop.method.genetic.GeneticSearch`, the GA and its polish rounds.
- ``epps``: EvoP's search assembled once: heuristic seeds, mutation prior and the GA.
- ``scoring``: how a search sees the fitness (callable type, divergence, counting, the memo).
- ``influence``: ShortGPT's Block Influence of every layer, the seeds and prior built on it.
- ``outcome``: :class:`~evop.method.outcome.Outcome`, what any search method found and what it cost.
- ``calibration``: CCDS, the calibration set drawn across clusters of a pool of token blocks.
- ``fitness``: :class:`~evop.method.fitness.PatternScorer`, perplexity or KL of a pattern, in place.
"""
