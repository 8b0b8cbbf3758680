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


def test_the_overview_says_when_the_pool_cannot_reach_the_threshold(page, admin_user, tiny_policy, settings):
    """Nothing left to rank: the overview says so with the numbers and the admin trains on what there is."""
    from labeling import services as labeling_services
    from labeling.models import Message, Role, TaskKind
    from labeling.services import RankingInput
    from tests.support.factories import ConversationFactory, MessageFactory, UserFactory
    from tests.support.labeling import set_queue
    from tests.support.training import set_loop
    from training_jobs.models import TrainingRun

    settings.TRAINING_MIN_RANKINGS = 1
    settings.SAMPLING_RESAMPLE_TIED = 0
    set_queue(rank_overlap_fraction=0)
    set_loop(rm_threshold=80)
    labeler = UserFactory(username="rita")
    context = MessageFactory(conversation=ConversationFactory(split="train"), text="What is a good first pet?")
    candidates = [
        labeling_services.message_create(
            conversation=context.conversation,
            parent=context,
            role=Role.ASSISTANT,
            text=f"Reply {i}.",
            origin=Message.Origin.MODEL,
            model_version=tiny_policy,
            sampling_params={"temperature": 1.0},
        )
        for i in range(2)
    ]
    labeling_services.task_create(
        kind=TaskKind.RANK_REPLIES, parent_message=context, candidates=candidates, model_version=tiny_policy
    )
    labeling_services.ranking_submit(
        assignment=labeling_services.task_lease_next(user=labeler),
        ranking=RankingInput(order=[[candidates[1].pk], [candidates[0].pk]], flags={}, confirm_untouched=True),
    )
    log_in(page, admin_user.username)
    page.goto("/ops/")
    outlook = page.get_by_test_id("pool-outlook")
    assert "nothing is left to rank" in outlook.inner_text()
    assert "1 of 80 new rankings give pairs" in outlook.inner_text()
    screenshot(page, "ops-pool-outlook")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_test_id("outlook-train-now").click()
    page.get_by_test_id("run-reason").wait_for()
    run = TrainingRun.objects.get()
    assert run.kind == "rm" and "below its threshold" in run.reason
