"""docs/index.md's method table is generated from registry.yaml and must not go stale."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import attnzoo

ROOT = Path(__file__).resolve().parent.parent


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_docs_index", ROOT / "scripts" / "gen_docs_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = load_generator()


def test_docs_index_table_is_up_to_date():
    current = gen.INDEX.read_text()
    assert gen.render(current) == current, "run: python scripts/gen_docs_index.py"
    assert gen.main(["--check"]) == 0


def test_table_has_one_row_per_registry_method():
    rows = gen.method_table().splitlines()[2:]
    assert len(rows) == len(attnzoo.list_methods())
    for name in attnzoo.list_methods():
        assert sum(f"`{name}`" in row for row in rows) == 1, name


def test_render_replaces_only_the_text_between_the_markers():
    page = f"intro\n{gen.BEGIN}\nold table\n{gen.END}\noutro\n"
    rendered = gen.render(page)
    assert rendered.startswith(f"intro\n{gen.BEGIN}\n| Method |")
    assert rendered.endswith(f"{gen.END}\noutro\n") and "old table" not in rendered
    assert gen.render(rendered) == rendered


def test_render_without_markers_says_what_is_missing():
    with pytest.raises(ValueError, match="BEGIN METHOD TABLE"):
        gen.render("no markers here")


def test_index_links_the_pages_it_promises():
    text = gen.INDEX.read_text()
    for page in ("installation.md", "quickstart.md", "benchmarking.md", "patching.md"):
        assert f"]({page})" in text, page
