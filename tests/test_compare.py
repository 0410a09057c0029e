"""`evop compare` on a tiny model: every part of the table, the JSON, equal budgets and resume."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from evop.cli import main
from evop.eval.compare_spec import (
    ANYTIME_CURVES,
    ANYTIME_PLOT,
    COMPARE_FILE,
    MAIN_METHODS,
    TABLE_FILE,
    CompareSpec,
)
from evop.method.fitness import PatternScorer
from tests.tiny_models import write_docs, write_sentences


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return {
        "calibration": write_docs(root / "wiki.jsonl"),
        "news": write_docs(root / "news.jsonl", seed=7),
        "books": write_docs(root / "books.jsonl", seed=8),
        "sentences": write_sentences(root / "sentences.jsonl"),
    }


def write_config(tiny_dir, texts, path):
    cfg = {
        "model": {"name_or_path": str(tiny_dir), "device": "cpu"},
        "calibration": {
            "dataset": str(texts["calibration"]),
            "pool_size": 32,
            "block_len": 32,
            "n_samples": 6,
            "embedder": "model",
            "n_clusters": 3,
        },
        "search": {
            "population": 6,
            "generations": 4,
            "patience": 10,
            "evopress_generations": 3,
            "evopress_offspring": 4,
            "exhaustive_limit": 100,
            "racing_ratio": 1.5,  # EvoP races its candidates, in 3 stages of 2 blocks
            "racing_confidence": 0.9,
        },
        "fitness": {"batch_size": 2},
        "evaluation": {
            "heldout": [str(texts["news"]), str(texts["books"])],
            "block_len": 32,
            "max_blocks": 4,
            "tasks": ["evop_lastword"],
            "task_source": str(texts["sentences"]),
            "task_examples": 8,
        },
        "output_dir": str(path.parent / "out"),
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


ARGS = ["--sparsities", "0.25,0.375", "--ablation-seeds", "0,1", "--optimum-k", "2", "--optimum-seeds", "0,1"]


def watch_scoring(monkeypatch) -> list:
    """Patterns the scorer forwards from now on, in full or stage by stage."""
    calls: list = []
    full, staged = PatternScorer.__call__, PatternScorer.stage_sums
    monkeypatch.setattr(PatternScorer, "__call__", lambda self, p: calls.append(p) or full(self, p))
    monkeypatch.setattr(
        PatternScorer, "stage_sums", lambda self, p, *a, **kw: calls.append(p) or staged(self, p, *a, **kw)
    )
    return calls


def test_compare_writes_every_table_and_resumes_without_rescoring(
    tiny_dir, texts, tmp_path, capsys, monkeypatch
):
    config = write_config(tiny_dir, texts, tmp_path / "compare.yaml")
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(config), "--out", str(out), *ARGS]) == 0
    printed = capsys.readouterr().out
    table = (out / TABLE_FILE).read_text()
    assert table in printed
    report = json.loads((out / COMPARE_FILE).read_text())
    units = report["units"]

    # Main table: every method at both sparsities, judged on both held-out domains.
    for sparsity, k in ((0.25, 2), (0.375, 3)):
        for method in MAIN_METHODS:
            row = units[f"main/{method}/{sparsity}"]
            assert row["k"] == k and len(row["removed_layers"]) == k
            assert set(row["heldout_ppl"]) == {"news", "books"}
            assert row["calib_fitness"] > 0 and row["evaluations"] >= 1 and row["search_seconds"] >= 0
            assert f"| {method} | {','.join(map(str, row['removed_layers']))} |" in table
        # Equal budgets: random scores exactly as many patterns as EvoP did.
        assert (
            units[f"main/random/{sparsity}"]["evaluations"] == units[f"main/evop/{sparsity}"]["evaluations"]
        )
        # The polish rounds follow the same GA: they add evaluations and never lose fitness.
        polished, ga = units[f"main/evop/{sparsity}"], units[f"main/evop-no-polish/{sparsity}"]
        assert (
            polished["calib_fitness"] <= ga["calib_fitness"] and polished["evaluations"] >= ga["evaluations"]
        )
        # Same calibration set and fitness: SLEB's greedy pattern can not beat exhaustive, and
        # no method beats the best of them all on the calibration fitness it optimised.
        assert units[f"main/sleb/{sparsity}"]["calibration"] == units[f"main/evop/{sparsity}"]["calibration"]
        # EvoP at SLEB's cost: the same GA, as many generations as fit in SLEB's count.
        longer = units[f"main/evop-sleb-budget/{sparsity}"]
        assert longer["evaluations"] <= units[f"main/sleb/{sparsity}"]["evaluations"]
        if longer["evaluations"] >= units[f"main/evop/{sparsity}"]["evaluations"]:
            assert longer["calib_fitness"] <= units[f"main/evop/{sparsity}"]["calib_fitness"]
    assert units["dense"]["heldout_ppl"]["news"] > 0
    assert "| geomean |" in table and "| tokens |" in table

    # Cost in tokens forwarded, and the anytime curve: the best pattern so far against seconds.
    for sparsity in (0.25, 0.375):
        for method in MAIN_METHODS:
            row = units[f"main/{method}/{sparsity}"]
            assert row["tokens_forwarded"] > 0, method
            curve = row["anytime"]
            assert curve and curve[-1]["pattern"] == row["pattern"], method
            # Only the curves the anytime question needs are judged point by point.
            assert method in ANYTIME_CURVES or len(curve) == 1, method
            seconds = [p["seconds"] for p in curve]
            fitness = [p["calib_fitness"] for p in curve]
            assert seconds == sorted(seconds) and fitness == sorted(fitness, reverse=True)
            assert all(p["heldout_geomean"] > 0 for p in curve)
        sleb = units[f"main/sleb/{sparsity}"]
        # Greedy: only its last round holds patterns of k layers, so its curve starts late.
        assert sleb["anytime"][0]["seconds"] > 0.5 * sleb["search_seconds"]
        # SLEB pays every pattern in full; EvoP's cost here includes its racing stages.
        assert sleb["tokens_forwarded"] % sleb["evaluations"] == 0
    assert (out / ANYTIME_PLOT).stat().st_size > 0

    # Ablation: both samplers for both seeds, on their own calibration sets.
    for sampler in ("ccds", "random"):
        for seed in (0, 1):
            row = units[f"ablation/{sampler}/{seed}"]
            assert row["calibration"] == f"{sampler}-seed{seed}" and row["k"] == 2
    assert "CCDS vs random calibration sampling" in table and "ccds mean ± std" in table
    assert "EvoP's GA vs SLEB's greedy search" in table

    # Optimum: exhaustive scored all C(6, 2) patterns and nothing beats it.
    best = units["optimum/exhaustive/2"]
    assert best["evaluations"] == math.comb(6, 2)
    for key, row in units.items():
        if key.startswith("optimum/") and row["k"] == 2:
            assert row["calib_fitness"] >= best["calib_fitness"] - 1e-9
    assert "found the optimum" in table and "random, same budget" in table
    assert "evaluations until found" in table

    # A re-run (e.g. after a crash) reads every finished result and scores nothing.
    calls = watch_scoring(monkeypatch)
    assert main(["compare", "--config", str(config), "--out", str(out), *ARGS]) == 0
    assert calls == []
    assert json.loads((out / COMPARE_FILE).read_text())["units"] == units


def test_compare_resumes_from_the_score_memo_after_a_crash(tiny_dir, texts, tmp_path, monkeypatch):
    config = write_config(tiny_dir, texts, tmp_path / "compare.yaml")
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--config",
        str(config),
        "--out",
        str(out),
        "--methods",
        "evop,sleb",
        "--sparsities",
        "0.25",
        "--ablation-seeds",
        "",
        "--optimum-k",
        "0",
    ]
    assert main(args) == 0
    report = json.loads((out / COMPARE_FILE).read_text())
    # Lose the finished results but keep the memo: the re-run replays without scoring.
    (out / COMPARE_FILE).unlink()
    calls = watch_scoring(monkeypatch)
    assert main(args) == 0
    again = json.loads((out / COMPARE_FILE).read_text())
    # Calibration and held-out scores are in their memo files: nothing is scored again.
    assert calls == []
    for key in ("main/evop/0.25", "main/sleb/0.25"):
        assert again["units"][key]["pattern"] == report["units"][key]["pattern"]
        assert again["units"][key]["evaluations"] == report["units"][key]["evaluations"]


def test_a_memo_with_a_pattern_no_search_could_ask_for_is_not_replayed(
    tiny_dir, texts, tmp_path, monkeypatch, caplog
):
    """A memo holding a protected layer's removal (an edit, or another model's file) is set aside
    with one ERROR line naming it, and its scores are computed again: the table is the same."""
    config = write_config(tiny_dir, texts, tmp_path / "compare.yaml")
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(config), "--out", str(out), "--methods", "sleb"]
    args += ["--sparsities", "0.25", "--ablation-seeds", "", "--optimum-k", "0"]
    assert main(args) == 0
    report = json.loads((out / COMPARE_FILE).read_text())
    (memo,) = out.glob("memo-ccds-seed0-*.json")
    data = json.loads(memo.read_text())
    data["full"]["0,3/8"] = [0.001, 0.0]  # better than anything: a search would be drawn to it
    memo.write_text(json.dumps(data))
    (out / COMPARE_FILE).unlink()
    calls = watch_scoring(monkeypatch)
    with caplog.at_level("ERROR", logger="evop"):
        assert main(args) == 0
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(memo.name in line and "protected layers [0]" in line for line in lines)
    assert (out / f"{memo.stem}-rejected.json").is_file() and calls  # scored again, not replayed
    again = json.loads((out / COMPARE_FILE).read_text())
    assert again["units"]["main/sleb/0.25"]["pattern"] == report["units"]["main/sleb/0.25"]["pattern"]


def test_compare_with_lm_eval_scores_each_pattern(tiny_dir, texts, tmp_path):
    config = write_config(tiny_dir, texts, tmp_path / "compare.yaml")
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--config",
        str(config),
        "--out",
        str(out),
        "--methods",
        "shortgpt,ppl-oneshot",
        "--sparsities",
        "0.25",
        "--ablation-seeds",
        "",
        "--optimum-k",
        "0",
        "--lm-eval",
    ]
    assert main(args) == 0
    units = json.loads((out / COMPARE_FILE).read_text())["units"]
    for key in ("dense", "main/shortgpt/0.25", "main/ppl-oneshot/0.25"):
        assert 0 <= units[key]["downstream"]["evop_lastword"] <= 1


def test_compare_refuses_bad_specs_and_reports_refused_searches(tiny_dir, texts, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown search method"):
        CompareSpec(methods=["evop", "magic"])
    config = write_config(tiny_dir, texts, tmp_path / "compare.yaml")
    args = [
        "compare",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "cmp"),
        "--methods",
        "exhaustive",
        "--sparsities",
        "0.5",
        "--ablation-seeds",
        "",
        "--optimum-k",
        "0",
        "search.exhaustive_limit=5",
    ]
    assert main(args) == 0
    assert "refused: exhaustive search over C(6, 4) = 15 patterns exceeds search.exhaustive_limit=5" in (
        capsys.readouterr().out
    )


def test_the_benchmark_script_is_the_same_command(tiny_dir, texts, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    config = write_config(tiny_dir, texts, tmp_path / "compare.yaml")
    root = Path(__file__).resolve().parent.parent
    args = [
        sys.executable,
        str(root / "benchmarks" / "compare.py"),
        "--config",
        str(config),
        "--out",
        str(tmp_path / "cmp"),
        "--methods",
        "evop,random",
        "--sparsities",
        "0.25",
        "--ablation-seeds",
        "",
        "--optimum-k",
        "0",
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 25% (2/8) | random |" in done.stdout
    assert (
        json.loads((tmp_path / "cmp" / COMPARE_FILE).read_text())["units"]["main/random/0.25"]["evaluations"]
        > 0
    )


def test_scores_are_not_shared_across_fitness_or_calibration_settings(tiny_dir, texts, tmp_path):
    config = write_config(tiny_dir, texts, tmp_path / "compare.yaml")
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--config",
        str(config),
        "--out",
        str(out),
        "--methods",
        "shortgpt",
        "--sparsities",
        "0.25",
        "--ablation-seeds",
        "",
        "--optimum-k",
        "0",
    ]
    assert main(args) == 0
    full = json.loads((out / COMPARE_FILE).read_text())["units"]["main/shortgpt/0.25"]
    (memo,) = out.glob("memo-*.json")
    scores = memo.read_text()
    assert main([*args, "fitness.token_budget=64"]) == 0  # 2 of the 6 calibration blocks
    cheap = json.loads((out / COMPARE_FILE).read_text())["units"]["main/shortgpt/0.25"]
    assert cheap["calib_fitness"] != full["calib_fitness"]
    assert len(list(out.glob("memo-*.json"))) == 2
    # Other blocks under the same memo name (model, fitness, sampler, seed): the old scores are not
    # read as these blocks' scores, and are kept aside rather than lost.
    assert main([*args, "calibration.n_samples=4"]) == 0
    four = json.loads((out / COMPARE_FILE).read_text())["units"]["main/shortgpt/0.25"]
    assert four["calib_fitness"] != full["calib_fitness"]
    (stale,) = out.glob(f"{memo.stem}-blocks-*.json")
    assert stale.read_text() == scores


def test_the_judge_keeps_each_finished_domain_of_a_stopped_pattern(tiny_dir, texts, tmp_path, monkeypatch):
    from evop.config import load_config
    from evop.eval.compare_judge import Judge
    from evop.method.patterns import Pattern
    from evop.models.loading import load_model

    cfg = load_config(write_config(tiny_dir, texts, tmp_path / "compare.yaml"))
    model, tokenizer = load_model(cfg.model)
    pattern = Pattern.of(8, [2, 5])
    judge = Judge(cfg, model, tokenizer, tmp_path, lm_eval=False)
    books = judge.heldout_scorers()["books"]
    score = PatternScorer.__call__

    class Stop(Exception):
        pass

    def stopped_at_books(self, p):
        if self is books:
            raise Stop
        return score(self, p)

    # Judging is stopped on the second domain: the first one's perplexity is on disk already.
    monkeypatch.setattr(PatternScorer, "__call__", stopped_at_books)
    with pytest.raises(Stop):
        judge.heldout(pattern)
    monkeypatch.undo()
    again = Judge(cfg, model, tokenizer, tmp_path, lm_eval=False)
    assert set(again.scores[str(pattern)]) == {"news"}
    news = again.scores[str(pattern)]["news"]
    # The re-run scores only the missing domain.
    calls = watch_scoring(monkeypatch)
    scores = again.heldout(pattern)
    assert set(scores) == {"news", "books"} and scores["news"] == news
    assert len(calls) == 1


def test_the_unraced_variant_scores_every_candidate_in_full_from_the_shared_memo(tiny_dir, texts, tmp_path):
    config = write_config(tiny_dir, texts, tmp_path / "compare.yaml")
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(config), "--out", str(out), "--methods", "evop,evop-unraced,sleb"]
    only = ["--sparsities", "0.25", "--ablation-seeds", "", "--optimum-k", "0", "--anytime-points", "1"]
    assert main([*args, *only]) == 0
    units = json.loads((out / COMPARE_FILE).read_text())["units"]
    raced, full = units["main/evop/0.25"], units["main/evop-unraced/0.25"]
    # --anytime-points 1: each curve is judged at its final pattern only
    assert [len(units[f"main/{m}/0.25"]["anytime"]) for m in ("evop", "sleb")] == [1, 1]
    # Every candidate of the unraced search costs all calibration tokens (6 blocks of 32), plus
    # the dense Block Influence forward that seeds the GA.
    assert full["tokens_forwarded"] == (full["evaluations"] + 1) * 6 * 32
    assert raced["tokens_forwarded"] < full["tokens_forwarded"]
    assert "no racing" in (out / TABLE_FILE).read_text()


def test_the_anytime_plot_keeps_final_differences_visible(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from evop.eval.plots import anytime_plot

    def row(method, curve):
        points = [{"seconds": t, "pattern": "", "calib_fitness": v, "heldout_geomean": v} for t, v in curve]
        return {"method": method, "sparsity": 0.2, "search_seconds": curve[-1][0], "anytime": points}

    report = {
        "units": {
            "main/evop/0.2": row("evop", [(1.0, 5000.0), (10.0, 60.0)]),
            "main/sleb/0.2": row("sleb", [(100.0, 62.0)]),
        }
    }
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig) or close(fig))
    assert anytime_plot(report, tmp_path / "anytime.png").is_file()
    (ax,) = figures[0].axes
    # A first pattern 80x worse than the last must not flatten the final 60 vs 62.
    assert ax.get_yscale() == "log" and ax.get_ylim() == pytest.approx((0.9 * 60.0, 3 * 62.0))

    # Panels hold different methods; each method keeps its colour in every panel.
    later = {**row("evopress", [(5.0, 70.0)]), "sparsity": 0.3}
    report["units"] |= {
        "main/evopress/0.3": later,
        "main/sleb/0.3": {**report["units"]["main/sleb/0.2"], "sparsity": 0.3},
    }
    anytime_plot(report, tmp_path / "two.png")
    colours = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in figures[-1].axes]
    assert colours[0]["sleb"] == colours[1]["sleb"] and colours[1]["evopress"] not in colours[0].values()


def test_the_readme_table_checks_issue_11s_targets_with_their_margins():
    """``benchmarks/compare_table.py``: EvoP meets the targets only with its geometric mean at or
    below every baseline's, no domain over 2% above the best baseline, and no slower than SLEB."""
    from benchmarks.compare_table import table, verdicts

    def row(method, news, books, seconds=10.0):
        return {
            "method": method, "sparsity": 0.3, "k": 3, "removed_layers": [1, 2, 3], "calib_fitness": 5.0,
            "heldout_ppl": {"news": news, "books": books}, "evaluations": 4, "tokens_forwarded": 64,
            "search_seconds": seconds,
        }  # fmt: skip

    def report(evop):
        units = {
            "dense": {"calib_fitness": 2.0, "heldout_ppl": {"news": 2.0, "books": 3.0}},
            "main/evop/0.3": evop,
            "main/sleb/0.3": row("sleb", 10.0, 10.0, seconds=20.0),
        }
        return {"num_layers": 10, "units": units}

    ok = verdicts({"m": report(row("evop", 9.0, 10.1))})[0]
    assert ok.startswith("m 30%: so far meets") and "-4.7%" in ok and "(books) +1.0%" in ok
    assert "not run: ppl-oneshot" in ok
    # Better on average, but 3% above the best baseline on one domain: a miss.
    assert "MISSES" in verdicts({"m": report(row("evop", 9.0, 10.3))})[0]
    assert verdicts({"m": report(row("evop", 9.0, 10.1))})[-1].endswith("at 30% or 40%: 30%")
    assert verdicts({"m": report(row("evop", 10.0, 10.0))})[-1].endswith("at 30% or 40%: no")
    # As good, but slower than SLEB: a miss.
    assert "MISSES" in verdicts({"m": report(row("evop", 9.0, 10.0, seconds=30.0))})[0]
    lines = table({"m": report(row("evop", 9.0, 10.1))})
    assert "| m 30% (3/10) | **evop** | 1,2,3 | 5.00 | **9.00** | 10.10 | **9.53** |" in lines[3]


def test_the_readme_table_adds_the_rows_of_other_folders_without_judging_them(tmp_path):
    """Several ``compare.json`` of one model: a method the first lacks is a row of the comparison;
    a method it has (an earlier EvoP) is shown under its folder's name, never against the targets."""
    from benchmarks.compare_table import merged, table, verdicts

    def row(method, ppl, seconds=10.0):
        return {
            "method": method, "sparsity": 0.3, "k": 3, "removed_layers": [1, 2, 3], "calib_fitness": 5.0,
            "heldout_ppl": {"news": ppl}, "evaluations": 4, "tokens_forwarded": 64, "search_seconds": seconds,
        }  # fmt: skip

    dense = {"calib_fitness": 2.0, "heldout_ppl": {"news": 2.0}}
    paths = []
    for folder, units in {
        "new": {"main/evop/0.3": row("evop", 9.0)},
        "old": {"main/evop/0.3": row("evop", 8.0, seconds=99.0), "main/sleb/0.3": row("sleb", 10.0)},
    }.items():
        (tmp_path / folder / "compare").mkdir(parents=True)
        paths.append(tmp_path / folder / "compare" / "compare.json")
        paths[-1].write_text(json.dumps({"num_layers": 10, "units": {"dense": dense, **units}}))
    report = merged([str(p) for p in paths])
    lines = table({"m": report})
    assert [line.split(" | ")[1] for line in lines[3:]] == ["**evop**", "sleb", "evop (old)"]
    assert "**8.00**" in lines[5]  # the best value of the sparsity, whichever row holds it
    # Judged against SLEB only: 9.0 vs 10.0 and 10 s vs 10 s; the old EvoP's 8.0 and 99 s ignored.
    assert len(table({"m": merged([str(paths[0]), f"{paths[1]}:sleb"])})) == 5  # no old EvoP
    verdict = verdicts({"m": report})[0]
    assert verdict.startswith("m 30%: so far meets | geomean vs closest baseline (sleb) -10.0%")


def test_only_the_anytime_points_the_plot_needs_are_judged():
    from evop.eval.compare_spec import ANYTIME_POINTS, anytime_to_judge

    trace = [(float(t), f"p{t}", 100.0 - t) for t in range(20)]
    # Whole curves, thinned to at most ANYTIME_POINTS: first and last kept, in order.
    judged = anytime_to_judge("evopress", trace)
    assert len(judged) == ANYTIME_POINTS and judged[0] == trace[0] and judged[-1] == trace[-1]
    assert judged == sorted(judged)
    assert anytime_to_judge("sleb", trace[:3]) == trace[:3]
    # Every other method: its final pattern only; so every method with --anytime-points 1.
    assert anytime_to_judge("random", trace) == trace[-1:]
    assert anytime_to_judge("evop", trace, 1) == trace[-1:]
    assert [p for _, p, _ in anytime_to_judge("evop", trace, 3)] == ["p0", "p10", "p19"]
    with pytest.raises(ValueError, match="anytime_points"):
        CompareSpec(anytime_points=0)
    # On the command line: one line naming the problem, exit 2, before any model is loaded.
    assert main(["compare", "--anytime-points", "0"]) == 2


def test_every_search_runs_before_the_anytime_curves_are_judged(tiny_dir, texts, tmp_path, monkeypatch):
    """A held-out judgement is costly (about 11 min a pattern on Gemma-3 on one core): a run
    stopped early has spent its time on the searches, and judges only their final patterns."""
    from evop.eval.compare import Comparison
    from evop.eval.compare_judge import Judge

    events: list[tuple[str, str]] = []
    search, heldout = Comparison.search, Judge.heldout

    def logged_search(self, method, *args, **kwargs):
        outcome = search(self, method, *args, **kwargs)
        events.append(("search", str(outcome.pattern)))
        return outcome

    def logged_heldout(self, pattern):
        events.append(("judge", "dense" if pattern is None else str(pattern)))
        return heldout(self, pattern)

    monkeypatch.setattr(Comparison, "search", logged_search)
    monkeypatch.setattr(Judge, "heldout", logged_heldout)
    config = write_config(tiny_dir, texts, tmp_path / "compare.yaml")
    out = tmp_path / "cmp"
    args = ["--methods", "evop,sleb", "--sparsities", "0.25,0.375", "--ablation-seeds", ""]
    args += ["--optimum-k", "0"]
    assert main(["compare", "--config", str(config), "--out", str(out), *args]) == 0

    last_search = max(i for i, (kind, _) in enumerate(events) if kind == "search")
    finals = {"dense"} | {p for kind, p in events if kind == "search"}
    assert {p for kind, p in events[:last_search] if kind == "judge"} <= finals
    units = json.loads((out / COMPARE_FILE).read_text())["units"]
    curves = [units[f"main/{m}/{s}"]["anytime"] for m in ("evop", "sleb") for s in (0.25, 0.375)]
    assert all(p["heldout_geomean"] > 0 for curve in curves for p in curve)
    assert any(len(curve) > 1 for curve in curves)  # the test would be empty without earlier points


def test_the_oracle_rejects_a_malformed_seed_before_loading_anything(tmp_path, capsys):
    """A typo in ``--seed`` is a usage error naming it, not a traceback after the model loads
    (the config here does not even exist: parsing comes first)."""
    from benchmarks.oracle import main as oracle

    missing = tmp_path / "missing.yaml"
    with pytest.raises(SystemExit) as exit_:
        oracle(["--config", str(missing), "--sparsity", "0.3", "--seed", "6,x"])
    assert exit_.value.code == 2
    assert "not comma-separated layer indices: '6,x'" in capsys.readouterr().err


def test_the_oracle_finds_the_held_out_optimum_and_judges_it_in_full(tiny_dir, texts, tmp_path, capsys):
    """``benchmarks/oracle.py`` on a space small enough to enumerate: its best pattern is the
    exhaustive optimum of the held-out geometric mean on the same windows, and the interleaved
    windows' perplexity is that geometric mean (equal windows per domain)."""
    from itertools import combinations

    from benchmarks.oracle import interleaved
    from benchmarks.oracle import main as oracle
    from evop.config import load_config
    from evop.eval.compare_report import geomean
    from evop.eval.perplexity import text_blocks
    from evop.method.patterns import Pattern
    from evop.models.loading import load_model

    config = write_config(tiny_dir, texts, tmp_path / "compare.yaml")
    out = tmp_path / "oracle"
    seed = "1,2,3"  # k = 3 of 8 layers at 0.375; layers 0 and 7 protected: C(6, 3) = 20 patterns
    args = ["--config", str(config), "--sparsity", "0.375", "--seed", seed, "--windows", "2"]
    args += ["--out", str(out)]
    assert oracle([*args, "--generations", "1", "--confirm", "2"]) == 0
    report = json.loads((out / "oracle-0.375.json").read_text())
    printed = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("| ") for line in printed) == len(report["rows"]) + 1  # header, rows

    cfg = load_config(str(config))
    model, tokenizer = load_model(cfg.model)
    e = cfg.evaluation
    per_domain = [text_blocks(s, tokenizer, e.block_len, 2) for s in e.heldout]
    whole = PatternScorer(model, interleaved(per_domain), "ppl", batch_size=2)
    parts = [PatternScorer(model, blocks, "ppl", batch_size=2) for blocks in per_domain]
    truth = {}
    for removed in combinations(range(1, 7), 3):
        pattern = Pattern.of(8, removed)
        truth[str(pattern)] = whole(pattern)
        assert math.isclose(truth[str(pattern)], geomean([p(pattern) for p in parts]), rel_tol=1e-4)
    optimum = min(truth, key=truth.get)
    rows = {r["pattern"]: r for r in report["rows"]}
    assert rows[f"{seed}/8"]["seed"] and optimum in rows
    assert math.isclose(rows[optimum]["oracle_ppl"], truth[optimum], rel_tol=1e-4)
    # The seeds and the best patterns are judged on the comparison's full held-out windows.
    assert all(set(r["heldout_ppl"]) == {"news", "books"} for r in rows.values())


def test_two_judges_of_one_model_keep_each_others_scores(tiny_dir, texts, tmp_path):
    """A comparison and the oracle (or two comparisons) judging into the same folder at once:
    neither write drops the other's judgements."""
    from evop.config import load_config
    from evop.eval.compare_judge import Judge
    from evop.method.patterns import Pattern
    from evop.models.loading import load_model

    cfg = load_config(str(write_config(tiny_dir, texts, tmp_path / "compare.yaml")))
    model, tokenizer = load_model(cfg.model)
    first, second = (Judge(cfg, model, tokenizer, tmp_path, lm_eval=False) for _ in range(2))
    first.heldout(Pattern.of(8, [3]))
    second.heldout(Pattern.of(8, [4]))  # saved after first's write, from a dict without [3]
    first.heldout(None)  # and first saves again, from a dict without [4]
    on_disk = json.loads(next(tmp_path.glob("heldout-*.json")).read_text())
    assert set(on_disk) == {"3/8", "4/8", "dense"}
    assert all(set(domains) == {"news", "books"} for domains in on_disk.values())
    # A judged pattern is read back without building the held-out scorers (a dense forward each).
    third = Judge(cfg, model, tokenizer, tmp_path, lm_eval=False)
    assert third.heldout(Pattern.of(8, [4])) == on_disk["4/8"] and third._heldout is None
