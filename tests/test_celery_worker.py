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
    assert 'data-testid="last-seen-training">never seen' in page
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
        assert f'data-testid="last-seen-{queue}">last seen {queue}@' in page


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
