"""How a hostile candidate looks in a real Chromium: code highlighted, nothing loaded or
clickable, Streamlit's extensions and LaTeX shown as typed, an invisible character shown."""

from __future__ import annotations

import pytest

from labeling.candidate_render import RENDERER_VERSION, view_hash
from store import db as storedb
from store import labels
from tests.fixtures_app import make_workspace, seed_round
from tests.test_browser import (  # noqa: F401 (serve and page are fixtures)
    add_account,
    expect_ranking,
    letter_ids,
    page,
    serve,
    sign_in,
    wait_idle,
)

pytestmark = pytest.mark.browser

HOSTILE = (
    "Here is the function:\n\n"
    "```python\ndef add(a, b):\n    return a + b\n```\n\n"
    "![x](http://127.0.0.1:9/x.png) <img src=x onerror=alert(1)> :red[verified] "
    "costs $5 and $10, [click](javascript:alert(1)) zero\u200bwidth"
)
LITERAL = [
    "[image: x](http://127.0.0.1:9/x.png)",
    "<img src=x onerror=alert(1)>",
    ":red[verified]",
    "costs $5 and $10",
    "[click](javascript:alert(1))",
    "zero⟨U+200B⟩width",
]


def test_a_hostile_candidate_is_shown_safely_and_as_written(serve, page, tmp_path):  # noqa: F811
    from playwright.sync_api import expect

    ws = make_workspace(tmp_path / "ws")
    seeded = seed_round(ws, n_groups=1, k=2, first_texts=[HOSTILE])
    gid, cids = seeded.group_ids[0], seeded.candidate_ids[0]
    letter = {cid: name for name, cid in letter_ids("ann", gid, cids).items()}
    add_account(ws, "ann")
    page.goto(serve(ws))
    sign_in(page, "ann")
    box = page.locator(f".st-key-cand_{letter[cids[0]]}")
    expect(box.get_by_test_id("stCode")).to_be_visible()
    wait_idle(page)

    # the fenced block is highlighted Python code (with a copy button)
    code = box.locator("code.language-python")
    expect(code).to_contain_text("def add(a, b):")
    assert code.locator(".token.keyword").count() >= 2  # def, return
    code.hover()
    expect(box.get_by_role("button", name="Copy to clipboard")).to_have_count(1)

    # nothing from the candidate became an element that loads, runs or links
    assert box.locator("img, script, iframe, a").count() == 0
    assert page.locator("a[href^='javascript']").count() == 0
    assert page.locator(".stMarkdownColoredText, [class*=ColoredText], .katex, math").count() == 0
    shown = box.inner_text().replace("\u2060", "")
    for text in LITERAL:
        assert text in shown, text
    expect(box.get_by_test_id("stAlertContentWarning")).to_contain_text(
        "1 invisible character shown as ⟨U+200B⟩"
    )

    # the raw toggle shows the exact text, the invisible character made visible
    box.get_by_text("raw", exact=True).click()
    raw_view = box.get_by_test_id("stCode").filter(has_text="onerror")
    expect(raw_view).to_be_visible()
    wait_idle(page)
    expect(box.get_by_test_id("stCode")).to_have_count(1)  # the rendered view is gone
    raw = raw_view.inner_text()
    assert HOSTILE.replace("\u200b", "⟨U+200B⟩") in raw
    assert box.locator("img, script, a").count() == 0

    # the label records the view it was given on
    first, second = letter[cids[0]], letter[cids[1]]
    page.locator(f".st-key-rank_{first} button").click()
    expect_ranking(page, f"1. {first}")
    page.locator(f".st-key-rank_{second} button").click()
    expect_ranking(page, f"1. {first}  2. {second}")  # the rerun that enables Submit is over
    page.locator(".st-key-submit button").click()
    expect(page.get_by_text("Saved your ranking.")).to_be_visible()
    wait_idle(page)
    with storedb.connect(ws) as con:
        row = labels.labels(con).iloc[0]
    assert row["ranking"] == [[cids[0]], [cids[1]]]
    assert row["render_version"] == RENDERER_VERSION
    assert row["render_hash"] == view_hash(dict(zip(cids, seeded.texts[0], strict=True)))
