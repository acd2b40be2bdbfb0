"""Checks on the transcribed Infinity-MM instruction tagging system (arXiv 2410.18558, Appendix C)."""

from pathlib import Path

import pytest
import yaml

TAXONOMY = Path(__file__).resolve().parents[1] / "recipes" / "taxonomies" / "infinity-mm.yaml"

CATEGORIES = [
    "Coarse Perception",
    "Fine-grained Perception (single-instance)",
    "Fine-grained Perception (cross-instance)",
    "Relation Reasoning",
    "Attribute Reasoning",
    "Logic Reasoning",
]

# The paper states 199 sub-tasks; the text of Appendix C yields 198 (see the file's header comment).
LEAVES_PER_CATEGORY = {
    "Coarse Perception": 89,
    "Fine-grained Perception (single-instance)": 46,
    "Fine-grained Perception (cross-instance)": 25,
    "Relation Reasoning": 6,
    "Attribute Reasoning": 10,
    "Logic Reasoning": 22,
}
TOTAL_LEAVES = 198


@pytest.fixture(scope="module")
def doc():
    with TAXONOMY.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _named(node):
    assert isinstance(node, dict), node
    assert isinstance(node.get("name"), str) and node["name"].strip() == node["name"] != ""


def test_loads_with_metadata(doc):
    assert isinstance(doc, dict)
    assert doc["name"] == "infinity-mm"
    assert doc["levels"] == ["category", "task", "subtask"]
    assert isinstance(doc["tree"], list)


def test_top_level_names_in_order(doc):
    assert [c["name"] for c in doc["tree"]] == CATEGORIES


def test_three_levels_everywhere(doc):
    for cat in doc["tree"]:
        _named(cat)
        assert set(cat) == {"name", "children"}
        assert isinstance(cat["children"], list) and cat["children"], cat["name"]
        for task in cat["children"]:
            _named(task)
            assert set(task) == {"name", "children"}
            assert isinstance(task["children"], list) and task["children"], task["name"]
            for leaf in task["children"]:
                _named(leaf)
                assert set(leaf) == {"name"}, (cat["name"], task["name"], leaf)


def test_unique_names_within_parent(doc):
    for cat in doc["tree"]:
        tasks = [t["name"] for t in cat["children"]]
        assert len(tasks) == len(set(tasks)), cat["name"]
        for task in cat["children"]:
            leaves = [leaf["name"] for leaf in task["children"]]
            assert len(leaves) == len(set(leaves)), (cat["name"], task["name"])


def test_leaf_counts(doc):
    counts = {c["name"]: sum(len(t["children"]) for t in c["children"]) for c in doc["tree"]}
    assert counts == LEAVES_PER_CATEGORY
    assert sum(counts.values()) == TOTAL_LEAVES


def test_single_direct_leaf_tasks_kept(doc):
    direct = {
        (c["name"], t["name"])
        for c in doc["tree"]
        for t in c["children"]
        if [leaf["name"] for leaf in t["children"]] == ["direct"]
    }
    assert direct == {
        ("Fine-grained Perception (single-instance)", "Identify specific object"),
        ("Fine-grained Perception (single-instance)", "Detect presence"),
        ("Fine-grained Perception (cross-instance)", "Determine relative position"),
    }
