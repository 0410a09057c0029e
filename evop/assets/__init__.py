"""Offline demo assets: a real small LM, a sentence embedder and English text, from package registries.

Modules:

- ``references``: the ``ASSETS`` catalogue, where assets live, ``evop-assets:`` references.
- ``build``: downloading and building the assets (``evop assets``).
- ``corpora``: plain prose from a Wikipedia dump and from Jane Austen's novels.
"""
