"""The Celery app: four queues, each served by its own worker process (see bin/worker and README).

- interactive: chat replies and labelers' model drafts. Short, latency-bound; the worker keeps the policy loaded.
- sampling: fills the pool of ranking tasks with K candidates per context. Batched and throughput-bound.
- training: SFT, reward model, PPO, DPO and RLOO runs, evaluation. Long, one at a time per worker, prefetch 1.
- control: beat's short periodic checks (the retraining loop's tick, lease expiry, reaping, queue upkeep). They
  never wait behind a sampling batch: on the sampling queue a tick expired unread while a pool fill held the
  worker for minutes, so a reached threshold never started its run (seen with bench/oracle.py). No torch.

Redelivery policy. Short tasks (interactive, sampling) are acknowledged late and re-queued when a worker dies:
their services are idempotent, so running one twice is harmless. Training tasks are acknowledged early, when a
worker takes them, so the broker never hands a long run to a second worker (Redis redelivers unacknowledged
messages after the visibility timeout, which a run can outlast). A run is claimed in the database with a
conditional UPDATE (queued -> running) before any work starts, so even a duplicated message cannot start a
second copy. A run whose worker died keeps its "running" row with a stale heartbeat; the periodic check marks
it failed with the error, and its partial artifact is never registered.
"""

import os

from celery import Celery
from kombu import Exchange, Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")

app = Celery("feedback_loop")
app.config_from_object("django.conf:settings", namespace="CELERY")

QUEUES = ("interactive", "sampling", "training", "control")

app.conf.update(
    task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
    task_default_queue="sampling",
    task_default_exchange="sampling",
    task_default_routing_key="sampling",
    task_routes={
        "models_service.tasks.chat_*": {"queue": "interactive"},
        "models_service.tasks.draft_reply": {"queue": "interactive"},
        "models_service.tasks.reap_sampling_requests": {"queue": "control"},
        "models_service.tasks.*": {"queue": "sampling"},
        "labeling.tasks.run_import": {"queue": "sampling"},
        "labeling.tasks.*": {"queue": "control"},
        "training_jobs.tasks.loop_tick": {"queue": "control"},
        "training_jobs.tasks.reap_lost_runs": {"queue": "control"},
        "training_jobs.tasks.*": {"queue": "training"},
        "config.celery_app.ping_*": {"queue": "interactive"},
    },
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_max_tasks_per_child=None,
    task_track_started=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    # Longer than any interactive or sampling task; training tasks are acknowledged on receipt (see above).
    broker_transport_options={"visibility_timeout": 3600},
    worker_hijack_root_logger=False,
    beat_schedule_filename=os.environ.get("CELERY_BEAT_SCHEDULE_FILE", "var/celerybeat-schedule"),
)
app.autodiscover_tasks()


def beat_schedule_entries() -> dict:
    from django.conf import settings

    return {
        "fill-ranking-pool": {
            "task": "models_service.tasks.fill_ranking_pool",
            "schedule": float(settings.SAMPLING_POOL_SCHEDULE_S),
            "options": {"expires": settings.SAMPLING_POOL_SCHEDULE_S},
        },
        "expire-leases": {"task": "labeling.tasks.expire_leases", "schedule": 60.0, "options": {"expires": 60}},
        "vacuum-queue-tables": {
            "task": "labeling.tasks.vacuum_queue_tables",
            "schedule": float(settings.QUEUE_VACUUM_SCHEDULE_S),
            "options": {"expires": settings.QUEUE_VACUUM_SCHEDULE_S},
        },
        "replenish-prompt-tasks": {
            "task": "labeling.tasks.replenish_prompt_tasks",
            "schedule": 60.0,
            "options": {"expires": 60},
        },
        "reap-lost-imports": {"task": "labeling.tasks.reap_imports", "schedule": 60.0, "options": {"expires": 60}},
        "reap-lost-training-runs": {
            "task": "training_jobs.tasks.reap_lost_runs",
            "schedule": 60.0,
            "options": {"expires": 60},
        },
        "retraining-loop": {
            "task": "training_jobs.tasks.loop_tick",
            "schedule": float(settings.LOOP_TICK_S),
            "kwargs": {"from_beat": True},
            "options": {"expires": settings.LOOP_TICK_S},
        },
        "score-rankings": {
            "task": "models_service.tasks.score_rankings",
            "schedule": 300.0,
            "options": {"expires": 300},
        },
        "reap-sampling-requests": {  # a labeler may be waiting on a lost chat reply: check every minute
            "task": "models_service.tasks.reap_sampling_requests",
            "schedule": 60.0,
            "options": {"expires": 60},
        },
    }


@app.on_after_configure.connect
def _set_up_beat(sender, **kwargs):
    sender.conf.beat_schedule = beat_schedule_entries()


@app.task(name="config.celery_app.ping_queue", soft_time_limit=10, time_limit=20)
def ping_queue(token: str) -> dict:
    """Health probe: echoes back which queue and worker ran it. Used by the ops page and the tests."""
    from celery import current_task

    delivery = current_task.request.delivery_info or {}
    return {"token": token, "queue": delivery.get("routing_key"), "hostname": current_task.request.hostname}


def workers_by_queue(timeout: float = 1.0) -> dict[str, list[str]]:
    """{queue: the workers listening to it (queue@host names)} for every queue, from the workers' own answers to a
    broadcast over the broker; a queue no worker answered for has an empty list. Waits at most `timeout` s."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    result: dict[str, list[str]] = {queue: [] for queue in QUEUES}
    for worker, queues in sorted(replies.items()):
        for queue in queues:
            result.setdefault(queue["name"], []).append(worker)
    return result


# What each queue's absence stops, for the ops page.


def waiting_by_queue(queues) -> dict[str, int]:
    """{queue: messages waiting in the broker}; a queue nothing was ever sent to counts 0."""
    from amqp.exceptions import ChannelError

    counts = {}
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        for queue in queues:
            try:
                counts[queue] = channel.queue_declare(queue=queue, passive=True).message_count
            except ChannelError:
                counts[queue] = 0
    return counts
