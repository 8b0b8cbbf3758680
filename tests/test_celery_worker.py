"""A real Celery worker process per queue, on Redis, runs what is sent to its queue."""

import uuid

import pytest
from django.urls import reverse

from config.celery_app import QUEUES, ping_queue
from tests.support.workers import running_workers


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_each_queue_has_a_worker_that_runs_its_tasks(client, admin_user):
    client.force_login(admin_user)
    page = client.get(reverse("ops:workers")).content.decode()
    assert 'data-testid="workers-missing"' in page, "before the workers start, the ops page says none answers"
    assert page.split('data-testid="last-seen-training"')[1].split("</span>")[0].endswith(">not seen yet")
    assert 'data-testid="beat-missing"' in page, "nothing ticks: beat is missing"
    with running_workers(*QUEUES):
        # Issue 18: the ops page says which host serves which queue.
        page = client.get(reverse("ops:workers")).content.decode()
        assert 'data-testid="workers-missing"' not in page
        for queue in QUEUES:
            row = page.split(f'data-queue="{queue}"')[1].split("</tr>")[0]
            assert f"<code>{queue}@" in row
        tokens = {queue: uuid.uuid4().hex for queue in QUEUES}
        results = {queue: ping_queue.apply_async(args=[tokens[queue]], queue=queue) for queue in QUEUES}
        for queue, result in results.items():
            reply = result.get(timeout=30)
            assert reply["token"] == tokens[queue]
            assert reply["queue"] == queue
            assert reply["hostname"].startswith(f"{queue}@"), f"{queue} task ran on {reply['hostname']}"
    # Gone now: a worker that died reads differently from one that never started.
    page = client.get(reverse("ops:workers")).content.decode()
    for queue in QUEUES:
        seen = page.split(f'data-testid="last-seen-{queue}"')[1].split("</span>")[0]
        assert f">last seen {queue}@" in seen


@pytest.mark.django_db
def test_without_a_control_worker_the_page_blames_it_not_beat(client, admin_user):
    """Beat's ticks go through the control queue: with no control worker they pile up there, and the page must not
    send the admin to start a second beat (helper walk, issue 18)."""
    from config.celery_app import app

    with app.connection_for_write() as connection:
        connection.default_channel.queue_declare(queue="control")
        connection.default_channel.queue_purge("control")
    client.force_login(admin_user)
    page = client.get(reverse("ops:workers")).content.decode()
    warning = page.split('data-testid="beat-missing">')[1].split("</p>")[0]
    assert "No control worker takes beat" in warning and "bin/worker control" in warning
    assert "Nothing waits in the control queue" in warning and "start <code>bin/beat</code> once" in warning
    assert 'data-testid="waiting-control">0<' in page
    try:
        for _ in range(2):
            ping_queue.apply_async(args=["tick"], queue="control")  # as beat's ticks would
        page = client.get(reverse("ops:workers")).content.decode()
        warning = page.split('data-testid="beat-missing">')[1].split("</p>")[0]
        assert "2 tasks wait in the control queue, so beat is probably running" in warning
        assert "do not start a second one" in warning and "start <code>bin/beat</code>" not in warning
        assert 'data-testid="waiting-control">2<' in page
        beat_row = page.split('data-queue="beat"')[1].split("</tr>")[0]
        assert "ticks not taken" in beat_row and "never" not in beat_row, "the row agrees with the warning"
    finally:
        with app.connection_for_write() as connection:
            connection.default_channel.queue_purge("control")


@pytest.mark.parametrize(
    ("task_name", "queue"),
    [
        ("models_service.tasks.chat_reply", "interactive"),
        ("models_service.tasks.fill_ranking_pool", "sampling"),
        ("training_jobs.tasks.run_training", "training"),
        ("training_jobs.tasks.evaluate_candidate", "training"),
        ("labeling.tasks.run_import", "sampling"),
        ("models_service.tasks.score_rankings", "sampling"),
        # beat's short checks never queue behind a sampling batch (issue 14: the loop's tick starved there)
        ("training_jobs.tasks.loop_tick", "control"),
        ("training_jobs.tasks.reap_lost_runs", "control"),
        ("labeling.tasks.expire_leases", "control"),
        ("labeling.tasks.vacuum_queue_tables", "control"),
        ("labeling.tasks.replenish_prompt_tasks", "control"),
        ("models_service.tasks.reap_sampling_requests", "control"),
    ],
)
def test_tasks_route_to_their_queue_and_queues_do_not_share_a_binding(task_name, queue):
    from config.celery_app import app

    route = app.amqp.router.route({}, task_name)
    assert route["queue"].name == queue
    bindings = {(q.exchange.name, q.routing_key) for q in app.amqp.queues.values()}
    assert len(bindings) == len(QUEUES), "each queue needs its own exchange and routing key"
