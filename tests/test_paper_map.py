"""docs/paper_map.md is generated from the code's `# paper-map:` tags: every item has a tag, every tag names an item,
and the committed map equals a fresh one (a moved line makes it stale).

Run: python -m pytest tests/test_paper_map.py -q
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "docs"))
import paper_map  # noqa: E402


def test_every_item_has_a_tag_and_every_tag_an_item():
    found, unknown = paper_map.collect()
    assert not unknown, unknown
    assert all(found.values()), [name for name, hits in found.items() if not hits]


def test_tags_point_at_code_lines():
    found, _ = paper_map.collect()
    for item, hits in found.items():
        for name, line in hits:
            text = open(os.path.join(ROOT, name)).read().splitlines()[line - 1]
            assert text.strip() and not text.lstrip().startswith("#"), (item, name, line, text)


def test_committed_map_is_fresh():
    assert paper_map.main(["--check"]) == 0, "docs/paper_map.md is stale: run python docs/paper_map.py"
