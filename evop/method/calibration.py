"""Calibration data: text -> pool of token blocks -> CCDS sample.

CCDS (cluster-based calibration dataset sampling): embed every candidate block of the pool,
cluster the embeddings with k-means, and draw the calibration set across the clusters so it
covers the pool's variety instead of its first or most common texts. ``random`` sampling is kept
as the ablation baseline.

Each stage is its own function (:func:`load_texts`, :func:`block_pool`, :func:`embed_blocks`,
:func:`sample_pool`), so the pipeline can store every intermediate result;
:func:`build_calibration_set` runs them all in one go.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evop.errors import BadInputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from evop.config import CalibrationConfig

log = logging.getLogger(__name__)


class CalibrationDataError(BadInputError):
    """The calibration text could not be read, or is too small for the requested sample."""


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CalibrationDataError(
            f"{file} is not UTF-8 text (byte {err.start} is {err.object[err.start : err.start + 1]!r}); "
            "calibration text must be a UTF-8 .txt or .jsonl file"
        ) from None
    except OSError as err:
        raise CalibrationDataError(f"cannot read {file}: {err.strerror or err}") from None


def _read_local(path: Path, text_field: str) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise CalibrationDataError(f"no .txt or .jsonl files in directory {path}")
    texts: list[str] = []
    for file in files:
        if file.suffix == ".jsonl":
            for lineno, line in enumerate(_read_text(file).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CalibrationDataError(f"{file}:{lineno}: not valid JSON ({err.msg})") from None
                if text_field not in record:
                    raise CalibrationDataError(
                        f"{file}:{lineno}: no field {text_field!r} (fields: {', '.join(record)}); "
                        "set calibration.text_field"
                    )
                texts.append(str(record[text_field]))
        elif file.suffix == ".txt":
            texts.append(_read_text(file))
        else:
            raise CalibrationDataError(f"{file}: unsupported file type (use .txt or .jsonl)")
    return texts


def load_texts(
    source: str, dataset_config: str | None = None, split: str = "train", text_field: str = "text"
) -> list[str]:
    """Read documents from a local ``.txt``/``.jsonl`` file or directory, or a `datasets` name.

    Args:
        source: A path, an ``evop-assets:`` reference, or a dataset name such as ``"wikitext"``,
            optionally followed by a slice of its documents, Python style: ``wiki.jsonl[:90]`` for
            the first 90, ``evop-assets:wikipedia[90:]`` for the rest (how one corpus gives a
            calibration pool and held-out documents that never overlap).
        dataset_config: Dataset config name (e.g. ``"wikitext-2-raw-v1"``).
        split: Dataset split.
        text_field: Field that holds the text.

    Raises:
        CalibrationDataError: naming the source when it cannot be read or holds no text.
    """
    from evop.assets.references import resolve_reference

    name, documents = split_document_slice(source)
    resolved = resolve_reference(name)
    path = Path(resolved)
    if path.exists():
        texts = _read_local(path, text_field)
    else:
        if resolved.endswith((".txt", ".jsonl")) or "/" in resolved and resolved.startswith((".", "/")):
            raise CalibrationDataError(f"calibration file not found: {resolved}")
        texts = _load_dataset_texts(resolved, dataset_config, split, text_field)
    texts = [t for t in texts if t and t.strip()][documents]
    if not texts:
        raise CalibrationDataError(f"calibration source {source!r} holds no text")
    return texts


_DOCUMENT_SLICE = re.compile(r"^(?P<name>.+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def split_document_slice(source: str) -> tuple[str, slice]:
    """``"name[a:b]"`` -> ``("name", slice(a, b))``; a source without a slice gets all documents."""
    match = _DOCUMENT_SLICE.match(source)
    if match is None:
        return source, slice(None)
    start, stop = (int(match[g]) if match[g] else None for g in ("start", "stop"))
    return match["name"], slice(start, stop)


def _load_dataset_texts(name: str, config: str | None, split: str, text_field: str) -> list[str]:
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types (hub, config, split errors)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CalibrationDataError(
            f"cannot load dataset {name!r} (config {config!r}, split {split!r}): {first}"
        ) from err
    if text_field not in ds.column_names:
        raise CalibrationDataError(
            f"dataset {name!r} has no field {text_field!r} (fields: {', '.join(ds.column_names)}); "
            "set calibration.text_field"
        )
    return list(ds[text_field])


def token_blocks(
    texts: list[str], tokenizer: Any, block_len: int, max_blocks: int | None = None
) -> "torch.Tensor":
    """Tokenize and concatenate documents (EOS between them) and cut non-overlapping blocks.

    Args:
        texts: Documents, in order.
        tokenizer: A Hugging Face tokenizer.
        block_len: Tokens per block.
        max_blocks: Stop tokenizing once this many blocks are filled (None: the whole text).

    Returns:
        ``(num_blocks, block_len)`` token ids; the tail shorter than a block is dropped.
    """
    limit = None if max_blocks is None else max_blocks * block_len
    return _cut_blocks(_token_ids(texts, tokenizer, limit), block_len, max_blocks)


def _token_ids(texts: list[str], tokenizer: Any, limit: int | None = None) -> list[int]:
    """The documents' token ids, EOS between them; stops once ``limit`` ids are collected."""
    ids: list[int] = []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.extend(sep)
        if limit is not None and len(ids) >= limit:
            break
    return ids


def _cut_blocks(ids: list[int], block_len: int, max_blocks: int | None = None) -> "torch.Tensor":
    import torch

    n = len(ids) // block_len if max_blocks is None else min(len(ids) // block_len, max_blocks)
    return torch.tensor(ids[: n * block_len], dtype=torch.long).view(n, block_len)


def block_pool(
    texts: list[str],
    tokenizer: Any,
    block_len: int,
    pool_size: int,
    seed: int,
    min_blocks: int = 1,
    source: str | None = None,
) -> "torch.Tensor":
    """The candidate pool: ``pool_size`` blocks drawn evenly at random from the text.

    Args:
        source: Where the text came from (``calibration.dataset``), named in errors.

    Raises:
        CalibrationDataError: naming the source, when the text is shorter than one block, or
            yields fewer than ``pool_size`` (or ``min_blocks``) blocks: a smaller pool than asked
            would silently change the sampling (and cap the clusters), so it is refused.
    """
    import torch

    what = f"calibration text {source!r}" if source else "calibration text"
    ids = _token_ids(texts, tokenizer)
    blocks = _cut_blocks(ids, block_len)
    if blocks.shape[0] == 0:
        raise CalibrationDataError(
            f"{what} is too short: it has {len(ids)} tokens, and one block needs {block_len} "
            f"(calibration.block_len); use more text or a smaller calibration.block_len"
        )
    need = max(pool_size, min_blocks)
    if blocks.shape[0] < need:
        raise CalibrationDataError(
            f"{what} is too short for the pool asked: its {len(ids)} tokens give "
            f"{blocks.shape[0]} blocks of {block_len} tokens, but calibration.pool_size asks for "
            f"{need}; set calibration.pool_size to at most {blocks.shape[0]} (with n_samples and "
            "n_clusters no larger), use a smaller calibration.block_len, or use more text"
        )
    if blocks.shape[0] > pool_size:
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(blocks.shape[0], size=pool_size, replace=False))
        blocks = blocks[torch.from_numpy(chosen)]
    return blocks


def embed_with_model(model: "nn.Module", blocks: "torch.Tensor", batch_size: int = 8) -> np.ndarray:
    """Mean-pooled last hidden states of ``model`` for each block, L2-normalised: ``(N, H)``."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)
            hidden = model.base_model(input_ids=batch, use_cache=False).last_hidden_state  # (B, T, H)
            out.append(torch.nn.functional.normalize(hidden.float().mean(1), dim=-1).cpu())
    return torch.cat(out).numpy()


def embed_with_sentence_model(texts: list[str], embedder: str, device: str = "cpu") -> np.ndarray:
    """Sentence-transformers embeddings of ``texts`` (L2-normalised): ``(N, D)``."""
    from sentence_transformers import SentenceTransformer

    from evop.assets.references import resolve_reference

    path = resolve_reference(embedder)
    try:
        encoder = SentenceTransformer(path, device=device)
    except Exception as err:
        raise CalibrationDataError(f"cannot load sentence embedder {embedder!r}: {err}") from err
    return encoder.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)


def _allocate(sizes: np.ndarray, n: int, rule: str) -> np.ndarray:
    """Samples per cluster: ``rule`` shares summing to ``n``, at most each cluster's size.

    Every cluster gets at least one sample when ``n`` >= the number of clusters (coverage is the
    point of CCDS); the rest follows the rule by largest remainder.
    """
    c = len(sizes)
    alloc = np.zeros(c, dtype=int)
    if n >= c:
        alloc += 1
    remaining = n - alloc.sum()
    while remaining > 0:
        room = sizes - alloc
        weights = (sizes if rule == "proportional" else np.ones(c)) * (room > 0)
        share = weights / weights.sum() * remaining
        extra = np.minimum(np.floor(share).astype(int), room)
        if extra.sum() == 0:
            # Largest remainder, ties to the larger cluster then the lower index: deterministic.
            order = sorted(range(c), key=lambda i: (-(share[i] - extra[i]), -sizes[i], i))
            extra[next(i for i in order if room[i] > 0)] = 1
        alloc += extra
        remaining = n - alloc.sum()
    return alloc


def kmeans_sample(
    embeddings: np.ndarray,
    n_samples: int,
    n_clusters: int,
    per_cluster: str = "proportional",
    within_cluster: str = "nearest",
    seed: int = 0,
) -> tuple[list[int], np.ndarray]:
    """CCDS: cluster ``embeddings`` with k-means and draw ``n_samples`` indices across clusters.

    Args:
        embeddings: ``(N, D)`` one row per pool block.
        n_samples: How many indices to draw (<= N).
        n_clusters: k-means clusters (at most N).
        per_cluster: ``"proportional"`` to cluster size, or ``"equal"``.
        within_cluster: ``"nearest"`` to the centroid first, or ``"random"``.
        seed: Seeds k-means and the within-cluster draw.

    Returns:
        ``(indices, labels)``: sorted pool indices of the sample, and each pool block's cluster.
    """
    from sklearn.cluster import KMeans

    n = embeddings.shape[0]
    if not 1 <= n_samples <= n:
        raise CalibrationDataError(f"cannot draw {n_samples} samples from a pool of {n}")
    if not 1 <= n_clusters <= n:
        raise CalibrationDataError(
            f"cannot make {n_clusters} clusters (calibration.n_clusters) from a pool of {n} blocks: "
            "set calibration.n_clusters to at most calibration.pool_size"
        )
    k = n_clusters
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(embeddings)
    labels = km.labels_
    sizes = np.bincount(labels, minlength=k)
    alloc = _allocate(sizes, n_samples, per_cluster)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for cluster in range(k):
        members = np.flatnonzero(labels == cluster)
        if within_cluster == "nearest":
            dist = np.linalg.norm(embeddings[members] - km.cluster_centers_[cluster], axis=1)
            members = members[np.argsort(dist, kind="stable")]
        else:
            members = rng.permutation(members)
        chosen.extend(int(i) for i in members[: alloc[cluster]])
    return sorted(chosen), labels


def round_robin(groups: Sequence[int]) -> list[int]:
    """Positions ``0..n-1`` reordered round-robin over their groups (``groups[i]``), groups in order:
    ``calibration.order: mixed``, so each racing batch holds blocks of several CCDS clusters (README,
    Racing: it fixed a raced-out winner on Gemma-3 20% and did worse at 30%)."""
    members: dict[int, list[int]] = {}
    for position, group in enumerate(groups):
        members.setdefault(int(group), []).append(position)
    ordered = [members[g] for g in sorted(members)]
    return [m[r] for r in range(max(map(len, ordered), default=0)) for m in ordered if r < len(m)]


def random_sample(pool_size: int, n_samples: int, seed: int = 0) -> list[int]:
    """The ablation baseline: ``n_samples`` distinct pool indices uniformly at random."""
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(pool_size, size=n_samples, replace=False))


@dataclass
class CalibrationSet:
    """The sampled calibration blocks and how they were drawn."""

    blocks: "torch.Tensor"  # (n_samples, block_len)
    pool_indices: list[int]
    method: str
    pool_size: int
    n_clusters: int = 0
    cluster_sizes: list[int] = field(default_factory=list)
    sample_clusters: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "n_samples": int(self.blocks.shape[0]),
            "block_len": int(self.blocks.shape[1]),
            "pool_size": self.pool_size,
            "n_clusters": self.n_clusters,
            "clusters_covered": len(set(self.sample_clusters)),
        }


def embed_blocks(
    pool: "torch.Tensor", cfg: "CalibrationConfig", tokenizer: Any, model: "nn.Module | None" = None
) -> np.ndarray:
    """Embeddings of the pool blocks with the configured embedder: ``(P, D)``."""
    if cfg.embedder == "model":
        if model is None:
            raise ValueError("embedder 'model' needs the model")
        return embed_with_model(model, pool)
    device = str(next(model.parameters()).device) if model is not None else "cpu"
    texts_of_blocks = tokenizer.batch_decode(pool, skip_special_tokens=True)
    return embed_with_sentence_model(texts_of_blocks, cfg.embedder, device=device)


def sample_pool(
    pool: "torch.Tensor", cfg: "CalibrationConfig", embeddings: np.ndarray | None
) -> CalibrationSet:
    """Draw the calibration set from the pool: CCDS on ``embeddings``, or uniformly at random."""
    if cfg.method == "random":
        idx = random_sample(pool.shape[0], cfg.n_samples, cfg.seed)
        if cfg.order == "mixed":  # stretches of the text stand in for the clusters
            idx = [idx[i] for i in round_robin([i * cfg.n_clusters // len(idx) for i in range(len(idx))])]
        return CalibrationSet(pool[idx], idx, "random", int(pool.shape[0]))
    if embeddings is None:
        raise ValueError("CCDS needs the pool's embeddings")
    idx, labels = kmeans_sample(
        embeddings, cfg.n_samples, cfg.n_clusters, cfg.per_cluster, cfg.within_cluster, cfg.seed
    )
    if cfg.order == "mixed":
        idx = [idx[i] for i in round_robin([int(labels[j]) for j in idx])]
    sizes = np.bincount(labels).tolist()
    n_pool = pool.shape[0]
    log.info("CCDS: %d of %d pool blocks in %d clusters (sizes %s)", len(idx), n_pool, len(sizes), sizes)
    return CalibrationSet(
        pool[idx], idx, "ccds", int(n_pool), len(sizes), sizes, [int(labels[i]) for i in idx]
    )


def build_calibration_set(
    cfg: "CalibrationConfig", tokenizer: Any, model: "nn.Module | None" = None, texts: list[str] | None = None
) -> CalibrationSet:
    """Read the text, cut the pool and draw the calibration set as ``cfg`` says.

    Args:
        cfg: Calibration settings.
        tokenizer: Tokenizer of the model being pruned.
        model: Needed only when ``cfg.embedder == "model"``.
        texts: Documents to use instead of reading ``cfg.dataset`` (already loaded).
    """
    if texts is None:
        texts = load_texts(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_field)
    pool = block_pool(
        texts, tokenizer, cfg.block_len, cfg.pool_size, cfg.seed, min_blocks=cfg.n_samples, source=cfg.dataset
    )
    embeddings = embed_blocks(pool, cfg, tokenizer, model) if cfg.method == "ccds" else None
    return sample_pool(pool, cfg, embeddings)
