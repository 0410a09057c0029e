"""Plain prose from the raw text packages: Wikipedia articles and Jane Austen's novels.

:func:`wikipedia_articles` reads a MediaWiki XML dump and strips the markup down to prose
(templates, references, tables, files and categories go; stubs with less than
:data:`MIN_ARTICLE_CHARS` characters of prose are dropped). :func:`austen_novels` reads
``janeaustenr``'s R lazy-load database without R and joins the lines of each novel into
paragraphs. Both return ``{"title": ..., "text": ...}`` records, one per document, which
:mod:`evop.assets.build` writes as JSON lines.
"""

from __future__ import annotations

import bz2
import gzip
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from evop.assets.references import AssetError

# Articles whose prose is shorter than this after stripping the markup are dropped (stubs whose
# content was all templates, tables or lists of links).
MIN_ARTICLE_CHARS = 200


# The R object names in janeaustenr, in the order and with the titles of janeaustenr::austen_books().
_AUSTEN_TITLES = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


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
