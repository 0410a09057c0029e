"""The ``evop`` command line: assets, search, run, prune, register, ppl, bench, compare."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from evop.config import ConfigError, EvoPConfig, load_config
from evop.errors import BadInputError, EvoPError
from evop.records import format_number

log = logging.getLogger("evop")

EXAMPLES = """\
examples:
  evop assets                                   # prepare the offline demo model and text
  evop run --config configs/demo.yaml           # the whole pipeline as a Prefect flow
  evop search --config configs/demo.yaml        # CCDS + EPPS only, writes result.json
  evop search --config my.yaml search.sparsity=0.3 model.name_or_path=meta-llama/Llama-3.1-8B
  evop prune --result runs/demo/result.json     # write the pruned checkpoint
  evop register --result runs/demo/result.json  # register a finished run in MLflow (after an outage)
  evop ppl runs/demo/pruned-model --base evop-assets:smollm2 --text evop-assets:news
  evop search --config configs/demo.yaml search.method=sleb   # a baseline instead of EvoP's GA
  evop compare --config configs/compare-demo.yaml   # EvoP vs SLEB, ShortGPT, ... plus ablations
"""


NOISY_LOGGERS = ("httpx", "urllib3", "sentence_transformers", "filelock", "botocore", "boto3", "s3transfer")
"""Libraries whose INFO lines say nothing to a user (botocore: "Found credentials" per client)."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _table(title: str, rows: list[tuple[str, Any]], locations: list[tuple[str, str]] = ()) -> None:
    """A two-column summary table, then ``locations`` as plain lines (paths stay whole)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value if isinstance(value, str) else f"{value}")
    console = Console()
    console.print(table)
    for key, path in locations:
        console.print(f"{key}: {path}", soft_wrap=True, highlight=False)


# ---------------------------------------------------------------------------------------------


def cmd_assets(args: argparse.Namespace) -> int:
    from evop.assets.build import DEFAULT_ASSETS, prepare_assets

    paths = prepare_assets(tuple(args.names or DEFAULT_ASSETS), force=args.force)
    _table("evop assets", [(name, str(path)) for name, path in paths.items()])
    return 0


def _load_cfg(args: argparse.Namespace) -> EvoPConfig:
    return load_config(args.config, args.overrides)


def cmd_search(args: argparse.Namespace) -> int:
    from evop.pipeline.local import run_search
    from evop.pipeline.results import RESULT_FILE
    from evop.pipeline.summary import search_rows

    cfg = _load_cfg(args)
    args.search_config = cfg  # where a Ctrl-C finds the search
    with _ProgressBar(cfg, disable=args.quiet) as bar:
        result = run_search(cfg, on_generation=bar.update)
    _table("EvoP search", [*search_rows(result), ("result", str(Path(cfg.output_dir) / RESULT_FILE))])
    return 0


class _ProgressBar:
    """The search's progress bar, drawn from its first finished step on (not over the checks and
    the calibration before it), and wiped, not redrawn, when the search fails or is stopped."""

    def __init__(self, cfg: EvoPConfig, disable: bool):
        from evop.pipeline.progress import SearchProgress, total_steps

        self.tracker = SearchProgress(total_steps(cfg.search))
        self.disable = disable
        self.bar: Any = None

    def update(self, entry: dict[str, Any]) -> None:
        from tqdm import tqdm

        if self.bar is None:
            total = self.tracker.total_steps
            self.bar = tqdm(total=total, desc="EPPS steps", unit="step", disable=self.disable)
        self.tracker.update(entry)
        self.bar.n = self.tracker.done
        self.bar.set_postfix(self.tracker.postfix(entry))
        self.bar.refresh()

    def __enter__(self) -> "_ProgressBar":
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if self.bar is not None:
            self.bar.leave = kind is None
            self.bar.close()


def cmd_run(args: argparse.Namespace) -> int:
    from evop.pipeline.launcher import run_flow
    from evop.pipeline.preflight import check_run
    from evop.pipeline.summary import run_rows

    cfg = _load_cfg(args)
    check_run(cfg)  # bad input fails here, in seconds, before Prefect starts
    args.search_config = cfg  # where a Ctrl-C finds the search
    summary = run_flow(cfg)
    mlflow = summary.get("mlflow")
    locations = [
        ("checkpoints", summary["checkpoints"]),
        ("result", str(Path(cfg.output_dir) / "result.json")),
        ("pruned model", summary["pruned_model"]),
        *([("MLflow UI", mlflow["ui_command"])] if mlflow else []),
    ]
    _table("EvoP pipeline", run_rows(summary), locations)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from evop.models.loading import load_model
    from evop.models.pruning import save_pruned
    from evop.pipeline.results import read_result

    cfg, pattern, result = read_result(args.result, args.overrides)  # checked before any loading
    out = Path(args.out) if args.out else Path(args.result).parent / "pruned-model"
    model, tokenizer = load_model(cfg.model)
    save_pruned(
        model,
        tokenizer,
        pattern,
        out,
        base_model=cfg.model.name_or_path,
        extra={"fitness_metric": result.get("fitness_metric"), "fitness": result.get("fitness")},
    )
    _table(
        "evop prune",
        [("pattern", str(pattern)), ("layers kept", str(len(pattern.kept))), ("saved to", str(out))],
    )
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from evop.pipeline.evaluation import register_saved_run

    registered = register_saved_run(args.result, args.overrides)
    _table(
        "evop register",
        [("MLflow model", f"{registered['model_name']} version {registered['model_version']}")],
        [("MLflow UI", registered["ui_command"])],
    )
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from evop.config import ModelConfig
    from evop.eval.perplexity import load_blocks, perplexities, text_blocks
    from evop.models.layers import num_layers
    from evop.models.loading import load_model

    models = ([("dense", args.base)] if args.base else []) + [
        ("pruned" if args.base else "model", args.model)
    ]
    if not args.calibration and not args.text:
        raise ConfigError("nothing to score: give --calibration and/or --text")
    calibration = load_blocks(args.calibration) if args.calibration else None  # before any model
    rows: list[dict[str, Any]] = []
    for label, ref in models:
        model, tokenizer = load_model(ModelConfig(name_or_path=ref, device=args.device))
        sets = {} if calibration is None else {"calibration": calibration}
        for text in args.text:
            name = text.removeprefix("evop-assets:")
            sets[f"held-out {name}"] = text_blocks(text, tokenizer, args.block_len, args.max_blocks)
        ppl = perplexities(model, sets, args.batch_size)
        rows.append({"model": label, "path": ref, "layers": num_layers(model), **ppl})
        del model
    _ppl_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _ppl_table(rows: list[dict[str, Any]]) -> None:
    """One row per text, one column per model (plus pruned/dense when both are there)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="perplexity (lower is better)")
    table.add_column("text")
    for row in rows:
        table.add_column(f"{row['model']} ({row['layers']} layers)", justify="right")
    if len(rows) == 2:
        table.add_column("pruned / dense", justify="right")
    for key in [k for k in rows[0] if k not in ("model", "path", "layers")]:
        cells = [format_number(row[key], missing="diverged") for row in rows]
        if len(rows) == 2:
            cells.append(f"{rows[1][key] / rows[0][key]:.2f}x")
        table.add_row(key, *cells)
    Console().print(table)
    for row in rows:
        Console().print(f"  {row['model']}: {row['path']}")


def cmd_bench(args: argparse.Namespace) -> int:
    """Inference speed of a pruned model against its dense base (see :mod:`evop.eval.speed`): a
    saved checkpoint, or ``--pattern`` applied to an in-memory copy of the dense model."""
    import copy

    from evop.config import ModelConfig
    from evop.eval.speed import add_checkpoint_sizes, compare_speed
    from evop.eval.speed_report import format_speed_table
    from evop.method.patterns import Pattern
    from evop.models.loading import load_model, read_num_layers
    from evop.models.pruning import prune_layers

    if (args.model is None) == (args.pattern is None):
        raise ConfigError("give either a pruned model (PRUNED) or --pattern, not both")
    base = ModelConfig(name_or_path=args.base, device=args.device, dtype=args.dtype)
    if args.pattern:  # checked against the model's configuration before its weights are loaded
        pattern = Pattern.parse(args.pattern)
        layers = read_num_layers(base)
        if pattern.num_layers != layers:
            raise BadInputError(
                f"--pattern {args.pattern}: {args.base} has {layers} layers, not {pattern.num_layers}"
            )

    def load(ref: str):
        return load_model(base.model_copy(update={"name_or_path": ref}))

    dense, tokenizer = load(args.base)
    if args.pattern:
        pruned = prune_layers(copy.deepcopy(dense), pattern, base_model=args.base)
    else:
        pruned, _ = load(args.model)
    report = compare_speed(
        dense,
        pruned,
        tokenizer,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        batch_size=args.batch_size,
        warmup=args.warmup,
        runs=args.runs,
    )
    for label, ref in (("dense", args.base), ("pruned", args.model or f"pattern {args.pattern}")):
        report[label]["path"] = ref
    add_checkpoint_sizes(report, args.base, args.model)
    report["pattern"] = args.pattern
    print(format_speed_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _numbers(text: str, kind: type, flag: str) -> list:
    """``"0.2,0.3"`` as numbers of ``kind``; anything else is one line naming the flag."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        example = "0.2,0.3" if kind is float else "0,1,2"
        raise BadInputError(f"{flag} {text!r}: expected comma-separated numbers, e.g. {example}") from None


def cmd_compare(args: argparse.Namespace) -> int:
    """Search methods side by side (see :mod:`evop.eval.compare`): markdown table plus JSON."""
    from evop.eval.compare import Comparison
    from evop.eval.compare_spec import TABLE_FILE, CompareSpec
    from evop.pipeline.preflight import check_search

    spec = CompareSpec(
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        sparsities=_numbers(args.sparsities, float, "--sparsities"),
        ablation_seeds=_numbers(args.ablation_seeds, int, "--ablation-seeds"),
        optimum_k=args.optimum_k or None,
        optimum_seeds=_numbers(args.optimum_seeds, int, "--optimum-seeds"),
        lm_eval=args.lm_eval,
        anytime_points=args.anytime_points,
    )
    cfg = _load_cfg(args)
    check_search(cfg)
    out = Path(args.out or Path(cfg.output_dir) / "compare")
    Comparison(cfg, spec, out).run()
    print((out / TABLE_FILE).read_text())
    print(f"JSON: {out / 'compare.json'}")
    return 0


# ---------------------------------------------------------------------------------------------


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand parser that takes its options and its positionals (the ``key=value``
    overrides) in any order: ``evop search a=1 --quiet b=2`` (plain argparse consumes a ``*``
    positional once, so ``b=2`` after an option would be an unrecognized argument)."""

    _intermixed = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        if self._intermixed:  # the two passes of parse_known_intermixed_args
            return super().parse_known_args(args, namespace)
        self._intermixed = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evop",
        description="EvoP: remove whole decoder layers of an LLM, chosen by evolutionary search.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_IntermixedParser)

    p = sub.add_parser("assets", help="prepare the offline demo model, embedder and text")
    p.add_argument("names", nargs="*", help="assets to prepare (default: smollm2 minilm wikipedia news)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=cmd_assets)

    p = sub.add_parser("search", help="CCDS calibration sampling + evolutionary pattern search")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. search.sparsity=0.3")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("run", help="the whole pipeline as a resumable Prefect flow (search, prune, evaluate)")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. checkpoints=s3://bucket/evop"
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("prune", help="write the pruned checkpoint of a search result")
    p.add_argument("--result", required=True, help="result.json written by `evop search`")
    p.add_argument("--out", help="checkpoint directory (default: pruned-model beside result.json)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.device=cpu")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("register", help="log a finished run to MLflow and register its pruned model")
    p.add_argument("--result", required=True, help="result.json of `evop run` (pruned-model beside it)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. registry.tracking_uri=http://host:5000")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("ppl", help="perplexity of a model, or of dense vs pruned")
    p.add_argument("model", help="model directory or hub id (the pruned one when --base is given)")
    p.add_argument("--base", help="dense model to compare against")
    p.add_argument("--calibration", help="calibration.safetensors written by `evop search`")
    p.add_argument("--text", action="append", default=[], help="held-out text source (repeatable)")
    p.add_argument("--block-len", type=int, default=256, help="tokens per held-out window")
    p.add_argument("--max-blocks", type=int, default=16, help="held-out windows scored per source")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("bench", help="inference speed (prefill, decode tokens/s) of pruned vs dense")
    p.add_argument("model", nargs="?", help="pruned model directory or hub id (or give --pattern)")
    p.add_argument("--base", required=True, help="dense model to compare against")
    p.add_argument("--pattern", help="removed layers, e.g. '4,5,6/30': prune an in-memory copy of --base")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy decode steps with the KV cache")
    p.add_argument("--runs", type=int, default=3, help="timed runs per model (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per model first")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the full report as JSON here")
    p.set_defaults(func=cmd_bench)

    from evop.eval.compare_spec import MAIN_METHODS

    p = sub.add_parser("compare", help="EvoP vs the baselines (SLEB, ShortGPT, ...) side by side; ablations")
    p.add_argument("--config", help="YAML config file: model, calibration, search and held-out settings")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--methods", default=",".join(MAIN_METHODS), help="comma-separated search methods")
    p.add_argument("--sparsities", default="0.2,0.3", help="comma-separated sparsities of the main table")
    p.add_argument("--ablation-seeds", default="0,1,2", help="seeds of CCDS vs random sampling ('' skips it)")
    p.add_argument("--optimum-k", type=int, default=2, help="k of the exhaustive optimum check (0 skips it)")
    p.add_argument("--optimum-seeds", default="0,1,2,3,4", help="EvoP seeds of the optimum check")
    p.add_argument("--lm-eval", action="store_true", help="also score every pattern on evaluation.tasks")
    p.add_argument("--anytime-points", type=int, default=8, help="judged points of anytime curves (1: last)")
    p.add_argument("--out", help="output directory (default: <output_dir>/compare); re-runs resume")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        # Prefect formats the console (run and task names); the flow routes `evop` lines there.
        logging.getLogger("evop").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    else:
        _setup_logging(args.verbose)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except ConfigError as err:
        sep = "\n" if "\n" in str(err) else " "  # one line per problem; one problem: one line
        print(f"evop: invalid configuration:{sep}{err}", file=sys.stderr)
    except EvoPError as err:
        # The same verdict the task retry policy reads (evop.errors): say what to do about it.
        hint = "" if err.permanent else " (a transient failure: running the same command again resumes)"
        print(f"evop: {err}{hint}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"evop: stopped by Ctrl-C {_where_it_stopped(args)}", file=sys.stderr)
        return 130
    return 2


def _where_it_stopped(args: argparse.Namespace) -> str:
    """The rest of the one line printed on Ctrl-C: where the command stopped, and how to go on."""
    cfg = getattr(args, "search_config", None)
    if cfg is not None:  # a search (evop search, evop run): its store says where
        from evop.pipeline.summary import where_it_stopped

        return f"{where_it_stopped(cfg)}; run the same command again to resume from there"
    if args.command == "compare":
        return "; finished results are kept: run the same command again to resume"
    return "; nothing half-written was kept"


if __name__ == "__main__":
    sys.exit(main())
