"""The ops pages in a real browser, on a phone-sized screen: nothing runs off the page, every link can be reached,
and the Workers card says what is missing (no worker and no beat run in this test)."""

import pytest

from tests.support.browser import log_in, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.mark.parametrize("path", ["/ops/", "/ops/runs/", "/ops/models/"])
def test_ops_pages_fit_a_phone(page, admin_user, tiny_policy, path):
    page.set_viewport_size({"width": 390, "height": 844})
    log_in(page, admin_user.username)
    page.goto(path)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"{path} is {width} px wide on a 390 px screen"
    for nav in ("header .topnav a", "nav.subnav a"):
        links = page.locator(nav)
        assert links.count() >= 3
        for i in range(links.count()):
            box = links.nth(i).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, f"{nav} #{i} is off the screen: {box}"
    if path == "/ops/":
        workers = page.get_by_test_id("workers-missing")
        workers.wait_for()
        assert "training" in workers.inner_text()
        assert page.get_by_test_id("beat-missing").is_visible()
        assert page.get_by_test_id("loop-no-beat").is_visible()
        screenshot(page, "ops-phone")
