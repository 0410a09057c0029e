"""The pattern searches EvoP is compared with (all run by name through :mod:`evop.searches`).

Modules:

- ``greedy``: SLEB (arXiv 2402.09025), one layer removed per round.
- ``heuristics``: ShortGPT (arXiv 2403.03853) and Shortened LLaMA's PPL criterion (arXiv 2402.02834).
- ``sampling``: random search with a fixed budget, and exhaustive search (the true optimum).
- ``evopress``: EvoPress (arXiv 2410.14649), (1 + lambda) evolution with staged token budgets.
"""
