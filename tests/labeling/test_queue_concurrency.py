"""Concurrency against real Postgres: many labelers asking at once never overfill a task, and a double
submission from two threads counts once."""

import threading
from collections import Counter

import pytest
from django.db import connection

from labeling import services
from labeling.models import Assignment, Message, Task
from tests.support.factories import UserFactory
from tests.support.labeling import expire_lease, make_rank_task, make_reply_task

pytestmark = pytest.mark.django_db(transaction=True)


def run_at_once(functions):
    """Run the callables in threads released together by a barrier; return results (or exceptions)."""
    barrier = threading.Barrier(len(functions))
    results = [None] * len(functions)

    def runner(i, fn):
        try:
            barrier.wait()
            results[i] = fn()
        except Exception as exc:
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=runner, args=(i, fn)) for i, fn in enumerate(functions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


@pytest.mark.parametrize("round_", range(3))
def test_labelers_asking_at_once_never_exceed_a_tasks_overlap(round_):
    tasks = [make_rank_task(k=2, overlap=2) for _ in range(3)] + [make_reply_task() for _ in range(3)]
    slots = sum(t.overlap for t in tasks)
    labelers = [UserFactory(username=f"c{round_}-{i}") for i in range(14)]
    results = run_at_once([lambda u=u: services.task_lease_next(user=u) for u in labelers])
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    leases = [r for r in results if r is not None]
    per_task = Counter(a.task_id for a in leases)
    overlap = {t.pk: t.overlap for t in tasks}
    assert all(per_task[t] <= overlap[t] for t in per_task), per_task
    assert len(leases) == slots, f"{len(leases)} leases for {slots} slots among {len(labelers)} labelers"
    assert len({a.labeler_id for a in leases}) == len(leases)


def test_two_threads_submitting_the_same_assignment_count_once():
    task = make_reply_task()
    labeler = UserFactory(username="double-clicker")
    assignment = services.task_lease_next(user=labeler)
    results = run_at_once([lambda: services.reply_submit(assignment=assignment, text="Same reply.")] * 4)
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sorted(r.created for r in results) == [False, False, False, True]
    task.refresh_from_db()
    assert task.submitted_count == 1
    assert Message.objects.filter(parent=task.parent_message).count() == 1
    assert Assignment.objects.get(pk=assignment.pk).status == Assignment.Status.SUBMITTED


def test_two_labelers_racing_for_the_last_slot_of_an_expired_lease():
    task = make_reply_task()
    first, second, third = (UserFactory(username=f"race{i}") for i in range(3))
    stale = services.task_lease_next(user=first)
    expire_lease(stale)
    results = run_at_once(
        [
            lambda: services.reply_submit(assignment=stale, text="late reply"),
            lambda: services.task_lease_next(user=second),
            lambda: services.task_lease_next(user=third),
        ]
    )
    accepted = isinstance(results[0], services.SubmitResult)
    leased = [r for r in results[1:] if isinstance(r, Assignment)]
    assert accepted + len(leased) == 1, f"exactly one winner for the one slot: {results}"
    if not accepted:
        assert isinstance(results[0], services.SubmissionRefused)
    assert Task.objects.get(pk=task.pk).submitted_count == int(accepted)
