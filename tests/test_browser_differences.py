"""The differences view and the = key in a real Chromium over the served app."""

from __future__ import annotations

import pytest

from tests import test_browser as tb
from tests.fixtures_app import XSS, make_workspace, seed_round
from tests.test_differences import HOSTILE, diff_texts

pytestmark = pytest.mark.browser

serve = tb.serve  # the served app and the browser page, as the other browser tests use them
page = tb.page


def test_differences_view_and_equals_key_in_the_browser(serve, page, tmp_path):
    from playwright.sync_api import expect

    ws = make_workspace(tmp_path / "ws")
    texts = diff_texts()
    seeded = seed_round(ws, n_groups=1, k=4, first_texts=texts)
    gid, cids = seeded.group_ids[0], seeded.candidate_ids[0]
    ids = tb.letter_ids("kim", gid, cids)
    by_letter = {name: texts[cids.index(cid)] for name, cid in ids.items()}
    rain, coat = (n for n in sorted(by_letter) if "take an" in by_letter[n])
    tb.add_account(ws, "kim")
    page.goto(serve(ws))
    tb.sign_in(page, "kim")
    expect(page.get_by_text(f"{rain} and {coat} are near-identical")).to_be_visible()
    tb._expect_group(page, seeded, 0, done=0)  # waits until keys are caught

    tb.focus_page(page)
    page.keyboard.press(str(" ABCD".index(coat)))
    tb.expect_ranking(page, f"1. {coat}")
    page.keyboard.press("=")
    tb.expect_ranking(page, f"1. {coat} = {rain}")

    page.get_by_text("Differences", exact=True).click()
    view = page.locator(".st-key-diff_view")
    expect(view.get_by_text("Shared opening: 13 words")).to_be_visible()
    tb.wait_idle(page)
    # the highlight survives the page's HTML sanitiser; the hostile text inside it stays text
    marked = view.locator("span", has_text=":red[verified]").first
    expect(marked).to_be_visible()
    assert marked.evaluate("e => getComputedStyle(e).backgroundColor") not in (
        "rgba(0, 0, 0, 0)",
        "transparent",
    )
    assert HOSTILE in marked.inner_text()
    assert XSS in view.inner_text()
    assert page.locator('img[src="x"]').count() == 0
    assert page.locator('a[href^="javascript"]').count() == 0
    page.screenshot(path=str(tmp_path / "differences.png"), full_page=True)
