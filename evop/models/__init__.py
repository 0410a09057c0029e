"""Causal LMs as EvoP handles them: loading, reaching their decoder layers, saving them pruned.

Modules:

- ``loading``: a model and its tokenizer from the ``model`` config section (hub, directory, GGUF).
- ``layers``: where each family keeps its decoder layers, and running with only some of them.
- ``pruning``: a pattern materialised as a standard Hugging Face checkpoint with fewer layers.
"""
