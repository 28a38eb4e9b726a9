"""The docs stay true to the code: docs/CONFIGURATION.md's key tables are what
scripts/config_doc.py generates from the config schema now (a key added without regenerating
fails here), and every relative Markdown link in README.md and docs/*.md resolves."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _config_doc():
    spec = importlib.util.spec_from_file_location("config_doc", ROOT / "scripts" / "config_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_md_is_generated_from_the_schema():
    gen = _config_doc()
    text = (ROOT / "docs" / "CONFIGURATION.md").read_text(encoding="utf-8")
    committed = gen.committed_block(text)
    assert committed, "docs/CONFIGURATION.md lost its generated-block markers"
    assert committed == gen.render(), (
        "docs/CONFIGURATION.md is stale: run .venv/bin/python scripts/config_doc.py")


def test_the_generated_tables_cover_every_config_key():
    from lora_a2.config import all_keys

    block = _config_doc().render()
    documented = set(re.findall(r"^\| `([\w.]+)` \|", block, flags=re.M))
    from lora_a2 import strategies
    from lora_a2.strategies.options import option_names

    options = {f"strategy.options.{n}" for name, cls in strategies.REGISTRY.items()
               if cls.__module__.startswith("lora_a2.strategies.")
               for n in option_names(cls.Options)}
    assert options >= {"strategy.options.probe", "strategy.options.prune_gamma"}
    assert documented == set(all_keys()) | options


def test_the_generator_reads_field_docstrings():
    docs = _config_doc().field_docs(
        'class C:\n    a: int = 1\n    """First\n    line."""\n    b: str = ""\n')
    assert docs["C"]["a"] == ("int", "First line.")
    assert docs["C"]["b"] == ("str", "")


_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(text: str) -> list[str]:
    """Link targets outside code that are paths (no scheme, not a bare #anchor)."""
    text = _CODE.sub("", _FENCE.sub("", text))
    out = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I) or target.startswith("#"):
            continue
        out.append(target)
    return out


def test_relative_links_finds_links_and_skips_code_and_urls():
    text = ("[a](docs/A.md) ![f](figures/x.png) [u](https://x.org) [h](#top)\n"
            "`[c](in/code.md)`\n```\n[d](in/fence.md)\n```\n[e](B.md#sec)")
    assert relative_links(text) == ["docs/A.md", "figures/x.png", "B.md#sec"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(doc):
    broken = [t for t in relative_links(doc.read_text(encoding="utf-8"))
              if not (doc.parent / t.split("#", 1)[0]).exists()]
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


def test_readme_is_a_short_page_with_the_quickstart_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    # CI (.ci/run) and users run exactly these
    assert "./scripts/setup.sh && .venv/bin/lora-a2 run" in text
    assert "./scripts/setup.sh && .venv/bin/python -m pytest" in text
