"""Bad input, timed: each case run as a user would (`evop ...` in a fresh process, on the demo
model), with the line it prints and the seconds until it exits.

    python benchmarks/bad_input.py [--config configs/demo.yaml] [--json out.json]

Prints a markdown table: case, exit code, seconds, the message (the one line on stderr). Every case
must exit 2 (bad input) in seconds, before any model is loaded or anything is computed; the script
says so at the end, and exits 1 when a case did not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from evop.config import load_config
from evop.method.patterns import Pattern


def _result(cfg, removed: list[int], num_layers: int, **edits) -> dict:
    """A ``result.json`` of ``cfg`` as `evop search` writes it (the fields `evop prune` reads)."""
    pattern = Pattern.of(num_layers, removed)
    result = {
        "config": cfg.model_dump(mode="json"),
        "base_model": cfg.model.name_or_path,
        "num_layers": num_layers,
        "removed_layers": list(pattern.removed),
        "kept_layers": list(pattern.kept),
        "pattern": str(pattern),
        "config_hash": cfg.search_hash(),
    }
    return {**result, **edits}


def cases(config: str, tmp: Path) -> list[tuple[str, list[str], dict]]:
    """``(case, evop arguments, extra environment)`` of every bad input checked."""
    cfg = load_config(config)
    out = f"output_dir={tmp / 'run'}"
    binary = tmp / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    empty = tmp / "empty.yaml"
    empty.write_text("# only a comment\n")
    remote = load_config(config, ["model.trust_remote_code=true"])
    results = {
        "remote-code": _result(remote, [13, 14, 15, 16, 17, 18], 30),
        "layer-count": _result(cfg, [3, 4, 5, 6, 7, 8], 36),
        "protected": _result(cfg, [0, 14, 15, 16, 17, 29], 30),
        "base-model": _result(cfg, [13, 14, 15, 16, 17, 18], 30, base_model="someone/else"),
    }
    for name, result in results.items():
        (tmp / name).mkdir()
        (tmp / name / "result.json").write_text(json.dumps(result))
    search = ["search", "--config", config, "--quiet", out]
    closed = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
    }
    return [
        ("config file not UTF-8", ["search", "--config", str(binary)], {}),
        ("config file empty", ["search", "--config", str(empty)], {}),
        ("a directory as --config", ["search", "--config", str(tmp)], {}),
        ("a directory as --result", ["prune", "--result", str(tmp)], {}),
        (
            "`evop ppl --calibration` missing",
            ["ppl", "evop-assets:smollm2", "--calibration", str(tmp / "no")],
            {},
        ),
        ("`evop ppl --calibration` binary", ["ppl", "evop-assets:smollm2", "--calibration", str(binary)], {}),
        ("`evop compare --sparsities abc`", ["compare", "--config", config, "--sparsities", "abc", out], {}),
        ("sparsity and num_remove both set", [*search, "search.num_remove=4"], {}),
        ('output_dir=""', ["search", "--config", config, "--quiet", 'output_dir=""'], {}),
        ("block_len above the context", [*search, "calibration.block_len=16384"], {}),
        ("sparsity=nan", [*search, "search.sparsity=nan"], {}),
        ("device=cuda without a GPU", [*search, "model.device=cuda"], {}),
        ("`evop bench --pattern abc`", ["bench", "--base", "evop-assets:smollm2", "--pattern", "abc"], {}),
        ("S3 URL with credentials", [*search, "checkpoints=s3://AKIAEXAMPLE:secret@bucket/x"], {}),
        ("S3 endpoint unreachable", [*search, "checkpoints=s3://evop/x"], closed),
        (
            "tracking server unreachable",
            ["run", "--config", config, out, "registry.tracking_uri=http://127.0.0.1:9"],
            {},
        ),
        ("result asks for remote code", ["prune", "--result", str(tmp / "remote-code" / "result.json")], {}),
        (
            "result of another layer count",
            ["prune", "--result", str(tmp / "layer-count" / "result.json")],
            {},
        ),
        (
            "result removes protected layers",
            ["prune", "--result", str(tmp / "protected" / "result.json")],
            {},
        ),
        (
            "result with an edited base_model",
            ["prune", "--result", str(tmp / "base-model" / "result.json")],
            {},
        ),
    ]


def run(argv: list[str], env: dict) -> tuple[int, float, str]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "evop.cli", *argv], env={**os.environ, **env}, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("evop:")]
    return done.returncode, seconds, lines[-1] if lines else done.stderr.strip().splitlines()[-1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="evop-bad-input-") as tmp:
        for case, argv, env in cases(args.config, Path(tmp)):
            code, seconds, line = run(argv, env)
            message = str(line).replace(tmp, "<tmp>")  # the same table from every run
            rows.append({"case": case, "exit": code, "seconds": round(seconds, 1), "message": message})
            print(f"{case}: exit {code} in {seconds:.1f} s", file=sys.stderr)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(
        f"`python benchmarks/bad_input.py --config {args.config}` on {time.strftime('%Y-%m-%d')}, "
        f"commit {commit or 'unknown'}; seconds include starting Python (about 0.4 s)\n"
    )
    print("| case | exit | seconds | message |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['exit']} | {r['seconds']} | {str(r['message']).replace('|', '/')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    wrong = [r["case"] for r in rows if r["exit"] != 2]
    print(
        f"\n{len(rows) - len(wrong)} of {len(rows)} cases exit 2 with one line"
        + (f"; not: {wrong}" if wrong else "")
    )
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
