"""Checks of a configuration against the world, before any heavy work.

:class:`~evop.config.EvoPConfig` validates what a config says on its own (types, ranges, one
field against another). What it cannot know without looking elsewhere is checked here, in
seconds, before calibration, search or evaluation spend minutes: the model's layer count against
``k`` and ``protected_layers``, the text sources, the lm-eval task names, the output directory
and the checkpoint store. Each failure is an :class:`~evop.errors.EvoPError` naming the problem;
nothing is written except a probe file in ``output_dir``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from evop.config import ConfigError, EvoPConfig
from evop.errors import BadInputError

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".md")
"""Suffixes that make a text source a local file rather than a dataset name."""


def check_search(cfg: EvoPConfig) -> int:
    """Check what a search needs: the device, the model's layers against ``k`` and the protected
    layers, its context against the block length, the calibration text, the output directory and
    the checkpoint store.

    Returns:
        The model's decoder layer count.

    Raises:
        EvoPError: the first problem found, naming it.
    """
    from evop.method.patterns import layers_to_remove, removable_layers
    from evop.models.loading import ModelLoadError, resolve_device
    from evop.pipeline.space import model_shape

    check_output_dir(cfg)
    try:
        resolve_device(cfg.model.device)  # not after calibration has run on the CPU
    except ModelLoadError as err:
        raise BadInputError(f"model.device: {err}") from None
    n = model_shape(cfg).num_layers  # its configuration alone: seconds, not a model load
    s = cfg.search
    try:
        k = layers_to_remove(n, s.sparsity, s.num_remove)
    except ValueError as err:
        raise BadInputError(f"search.sparsity/num_remove: {err} ({cfg.model.name_or_path})") from None
    removable_layers(n, s.protected_layers, k)
    _check_context(cfg, "calibration.block_len", cfg.calibration.block_len)
    _check_source("calibration.dataset", cfg.calibration.dataset)
    _check_store(cfg)
    _check_scale(cfg)
    return n


def _check_context(cfg: EvoPConfig, field: str, tokens: int) -> None:
    """``tokens`` positions fit the model's context (where its configuration says how long)."""
    from evop.pipeline.space import model_shape

    context = model_shape(cfg).context
    if context is not None and tokens > context:
        raise BadInputError(
            f"{field}: {tokens} tokens exceed the context of {cfg.model.name_or_path} ({context} positions)"
        )


def _check_scale(cfg: EvoPConfig) -> None:
    """A Ray cluster to join must answer now, not after calibration (``scale.backend: ray``)."""
    if cfg.scale.backend == "ray":
        from evop.method.parallel import check_address

        check_address(cfg.scale)


def check_run(cfg: EvoPConfig) -> int:
    """:func:`check_search`, plus what the evaluation and registration after it need: held-out
    text sources, lm-eval task names, context lengths and the MLflow tracking store (none of
    them may be found wanting after the search has run).

    Returns:
        The model's decoder layer count.
    """
    n = check_search(cfg)
    e = cfg.evaluation
    _check_context(cfg, "evaluation.block_len", e.block_len)
    if e.speed:
        _check_context(cfg, "evaluation.prompt_len + new_tokens", e.prompt_len + e.new_tokens)
    for source in e.heldout:
        _check_source("evaluation.heldout", source)
    if e.tasks:
        from evop.eval.downstream import OFFLINE_TASKS, check_task_names

        if any(t in OFFLINE_TASKS for t in e.tasks):
            _check_source("evaluation.task_source", e.task_source)
        check_task_names(e.tasks, e.include_path)
    if cfg.registry.enabled:  # an unreachable tracking server must not be found after the search
        from evop.storage.tracking import check_registry

        check_registry(cfg)
    return n


def _check_source(field: str, source: str) -> None:
    """A text source that names a local file or an ``evop-assets:`` asset must exist; dataset
    names (``wikitext``, ``allenai/c4``) are left to the loader, which may need the network."""
    from evop.assets.references import REFERENCE_PREFIX, resolve_reference
    from evop.method.calibration import split_document_slice

    source, _ = split_document_slice(source)
    path = resolve_reference(source)  # an unprepared asset is an AssetError naming the fix
    local = (
        source.startswith((REFERENCE_PREFIX, "/", "./", "../", "~"))
        or Path(source).suffix.lower() in LOCAL_SUFFIXES
    )
    if local and not Path(path).expanduser().exists():
        raise BadInputError(f"{field}: {source!r} does not exist")


def _check_store(cfg: EvoPConfig) -> None:
    """The checkpoint store opens (a bad URI, a missing bucket, refused credentials fail here)."""
    from evop.pipeline.store import store_uri
    from evop.storage.stores import open_store

    store = open_store(store_uri(cfg))
    check = getattr(store, "check", None)
    if check is not None:
        check()


def check_output_dir(cfg: EvoPConfig) -> Path:
    """Make sure ``cfg.output_dir`` can be written: create it (and its parents) and a probe file
    in it, which is removed again. For the checks before any heavy work.

    Returns:
        The output directory.

    Raises:
        ConfigError: ``output_dir: cannot write to <dir>: <reason>``.
    """
    import tempfile

    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".evop-probe-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        if err.filename and str(err.filename) != str(out):
            reason = f"{reason} ({err.filename})"
        raise ConfigError(f"output_dir: cannot write to {out}: {reason}") from None
    return out
