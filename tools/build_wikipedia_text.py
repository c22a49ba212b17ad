"""Rebuild ``optimum_prune/data/wikipedia_excerpt.txt.xz`` from the Wikipedia dump in gensim's wheel.

The project ships the cleaned text so that calibration and perplexity need neither gensim nor
network access; this script documents (and reproduces byte for byte) how it was made:

    pip install gensim==4.4.0 mwparserfromhell==0.7.2
    python tools/build_wikipedia_text.py

Source: ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(English Wikipedia, 2016 dump excerpt; text under CC BY-SA 3.0 and GFDL, see the data README).
"""

from __future__ import annotations

import argparse
import bz2
import lzma
import re
import xml.etree.ElementTree as ElementTree
from importlib import resources
from pathlib import Path

import mwparserfromhell

SOURCE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
TARGET = Path(__file__).resolve().parents[1] / "optimum_prune" / "data" / "wikipedia_excerpt.txt.xz"
NAMESPACE = "{http://www.mediawiki.org/xml/export-0.10/}"
DROPPED_SECTIONS = {"references", "external links", "see also", "further reading", "notes",
                    "bibliography", "sources", "footnotes", "citations"}
DROPPED_LINK_PREFIXES = ("file:", "image:", "category:", "media:")
MIN_ARTICLE_CHARS = 2000


def clean_article(wikitext: str) -> str:
    """Plain prose of one article: templates, tables, refs, files and trailing sections removed."""
    code = mwparserfromhell.parse(wikitext)
    for link in code.filter_wikilinks():
        if str(link.title).strip().lower().startswith(DROPPED_LINK_PREFIXES) or ":" in str(link.title)[:4]:
            _remove(code, link)
    for tag in code.filter_tags():
        if str(tag.tag).lower() in {"ref", "table", "gallery", "math", "timeline", "references"}:
            _remove(code, tag)
    paragraphs: list[str] = []
    for section in code.get_sections(flat=True, include_lead=True):
        headings = section.filter_headings()
        if headings and headings[0].title.strip_code().strip().lower() in DROPPED_SECTIONS:
            continue
        for heading in headings:
            _remove(section, heading)
        text = section.strip_code(normalize=True, collapse=True)
        for line in text.splitlines():
            line = re.sub(r"\s+", " ", line).strip()
            if len(line) >= 40 and "|" not in line and not line.startswith(("*", "#", "!", "{", ";", ":")):
                paragraphs.append(line)
    return "\n".join(paragraphs)


def _remove(code: mwparserfromhell.wikicode.Wikicode, node: object) -> None:
    try:
        code.remove(node)
    except ValueError:  # already removed together with an enclosing node
        pass


def iter_articles(dump_bytes: bytes):
    root = ElementTree.fromstring(dump_bytes)
    for page in root.iter(f"{NAMESPACE}page"):
        if page.findtext(f"{NAMESPACE}ns") != "0" or page.find(f"{NAMESPACE}redirect") is not None:
            continue
        title = page.findtext(f"{NAMESPACE}title")
        text = page.findtext(f"{NAMESPACE}revision/{NAMESPACE}text") or ""
        yield title, text


def build() -> str:
    dump = bz2.decompress(resources.files("gensim").joinpath(SOURCE).read_bytes())
    articles = []
    for title, wikitext in iter_articles(dump):
        body = clean_article(wikitext)
        if len(body) >= MIN_ARTICLE_CHARS:
            articles.append(f"= {title} =\n{body}")
    return "\n\n".join(articles) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=TARGET)
    args = parser.parse_args()
    text = build()
    args.output.write_bytes(lzma.compress(text.encode("utf-8"), preset=9))
    print(f"{args.output}: {len(text):,} characters, {text.count(chr(10) * 2) + 1} articles")


if __name__ == "__main__":
    main()
