"""Chat in a real browser against a real interactive worker: the reply arrives while the page shows the
assistant typing, and alternatives to a model turn become a ranking task for the labeler."""

import pytest

from models_service.models import SamplingRequest
from tests.support.browser import log_in, screenshot
from tests.support.factories import UserFactory
from tests.support.workers import running_workers

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

WORKER_ENV = {"CHAT_MAX_NEW_TOKENS": "12", "SAMPLING_MAX_NEW_TOKENS": "12"}


def test_chat_with_the_policy_and_rank_alternatives(page, tiny_policy):
    UserFactory(username="lena")
    with running_workers("interactive", env=WORKER_ENV):
        log_in(page, "lena")
        page.click("text=Chat")
        page.fill("[data-testid=chat-input]", "Hello! What can you do?")
        page.keyboard.press("Control+Enter")
        page.wait_for_url("**/chat/*/")
        page.wait_for_selector(".turn-assistant[data-message-id]", timeout=60_000)
        assert page.locator(".turn-user").first.inner_text().endswith("Hello! What can you do?")
        screenshot(page, "chat")

        page.locator("details.alternatives summary").first.click()
        page.select_option("select[name=k]", "4")
        page.click("[data-testid=ask-alternatives]")
        page.wait_for_selector("[data-testid=alternatives-status]")
        request = SamplingRequest.objects.get(purpose="alternatives")
        for _ in range(120):
            request.refresh_from_db()
            if request.status in ("done", "failed"):
                break
            page.wait_for_timeout(500)
        assert request.status == "done", request.error
        page.reload()
        page.click("text=Rank them now")
        page.wait_for_selector("[data-testid=candidates]")
        assert page.locator("#candidates > li").count() == 4
        screenshot(page, "chat-alternatives-ranking")
