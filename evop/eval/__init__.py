"""Evaluating pruned models and comparing search methods.

Modules:

- ``perplexity``: dense and pruned perplexity on calibration blocks and held-out text.
- ``downstream``: lm-evaluation-harness accuracy, with offline tasks built from local text.
- ``speed``: dense vs pruned prefill and decode speed, and memory.
- ``plots``: figures of a finished search (fitness curve, layer removal frequency).
- ``compare``: the comparison runner (``evop compare``): methods side by side, resumable.
- ``compare_spec``: what a comparison compares (methods, EvoP ablation variants, output files).
- ``compare_report``: the comparison's markdown tables.
"""
