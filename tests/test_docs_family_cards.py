"""The docs hook that generates family pages from the installed specs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from worldflux_registry import registry

HOOK = Path(__file__).resolve().parents[1] / "docs" / "hooks" / "family_cards.py"


@pytest.fixture(scope="module")
def hook():
    spec = importlib.util.spec_from_file_location("family_cards", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", registry.list())
def test_every_family_gets_a_card_with_its_presets_and_contract(hook, name):
    family = registry.get(name)
    card = hook.family_card(name)
    for preset in family.presets:
        fingerprint = family.contract_for(family.config(preset)).fingerprint()
        assert f"| `{preset}` |" in card
        assert fingerprint[:23] in card
        if family.param_count:
            assert f"{family.param_count(family.config(preset)):,}" in card
    for state in family.contract_for(family.config()).state:
        assert f"| state | `{state.name}` |" in card


def test_markers_are_replaced_and_other_text_kept(hook):
    page = "intro\n<!-- family-card: dreamerv3 -->\noutro"
    out = hook.on_page_markdown(page)
    assert out.startswith("intro\n") and out.endswith("\noutro")
    assert "family-card" not in out and "| `ci` |" in out


def test_family_pages_use_the_generated_card():
    for name in ("dreamerv3", "tdmpc2"):
        page = (HOOK.parents[1] / "families" / f"{name}.md").read_text()
        assert f"<!-- family-card: {name} -->" in page
