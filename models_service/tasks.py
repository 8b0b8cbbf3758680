"""Celery tasks of the model service. Each takes ids, claims its work in the database, and calls the worker code.

torch is imported inside the task bodies, so the web process can import this module to enqueue.
"""

import logging
import os
import threading
import time

from celery import current_task, shared_task
from celery.signals import worker_process_init
from django.conf import settings

from models_service import services

logger = logging.getLogger(__name__)
PRELOAD_QUEUES = ("interactive", "sampling")


@worker_process_init.connect
def _preload_policy(**_) -> None:
    """An interactive or sampling worker loads the serving policy as it starts, in the background, so the first
    chat reply or draft does not wait for the model to load (8 s of a 14 s first reply with the default model), and
    a sampling worker then starts filling the ranking pool at once.
    bin/worker names the queue in WORKER_QUEUE; PRELOAD_POLICY=false turns it off."""
    if os.environ.get("WORKER_QUEUE") not in PRELOAD_QUEUES or os.environ.get("PRELOAD_POLICY", "true") == "false":
        return
    threading.Thread(target=_load_policy, name="preload-policy", daemon=True).start()


def _load_policy() -> None:
    from django.db import connection

    from models_service.loading import NoActiveModel, active_holder
    from models_service.models import ModelVersion

    try:
        loaded = active_holder(ModelVersion.Kind.POLICY).get()
        logger.info("preloaded %s", loaded.version_name)
        if os.environ.get("WORKER_QUEUE") == "sampling" and settings.SAMPLING_FILL_ON_START:
            # A fresh deployment offers ranking tasks as soon as the first batch is sampled, not after beat's
            # first tick (a new labeler's queue is otherwise empty for minutes).
            fill_ranking_pool.delay()
    except NoActiveModel:
        logger.info("no policy serves yet: nothing to preload")
    except Exception:  # the first task loads it again and reports the error on its request
        logger.exception("could not preload the policy")
    finally:
        connection.close()


def _worker_name() -> str:
    return getattr(current_task.request, "hostname", "") or ""


@shared_task(
    name="models_service.tasks.fill_ranking_pool",
    soft_time_limit=settings.SAMPLING_SOFT_TIME_LIMIT_S,
    time_limit=settings.SAMPLING_SOFT_TIME_LIMIT_S + 60,
    ignore_result=True,
)
def fill_ranking_pool(max_batches: int = 50) -> dict:
    """Keep the pool of open ranking tasks at SAMPLING_POOL_TARGET: sample batches until it is full."""
    from models_service.sampling import fill_pool_once

    totals = {"batches": 0, "contexts": 0}
    deadline = time.monotonic() + settings.SAMPLING_SOFT_TIME_LIMIT_S * 0.8
    for _ in range(max_batches):
        done = fill_pool_once(worker=_worker_name())
        if not done["contexts"]:
            break
        totals["batches"] += 1
        totals["contexts"] += done["contexts"]
        if time.monotonic() > deadline:
            break
    return totals


@shared_task(
    name="models_service.tasks.chat_reply",
    soft_time_limit=settings.INTERACTIVE_SOFT_TIME_LIMIT_S,
    time_limit=settings.INTERACTIVE_SOFT_TIME_LIMIT_S + 30,
    ignore_result=True,
)
def chat_reply(request_id: int) -> None:
    """The assistant's reply for the chat page."""
    _run(request_id)


@shared_task(
    name="models_service.tasks.chat_alternatives",
    soft_time_limit=settings.INTERACTIVE_SOFT_TIME_LIMIT_S,
    time_limit=settings.INTERACTIVE_SOFT_TIME_LIMIT_S + 30,
    ignore_result=True,
)
def chat_alternatives(request_id: int) -> None:
    """Fresh siblings of a model turn, ranked with it: a ranking task for the labeler or for others."""
    _run(request_id)


@shared_task(
    name="models_service.tasks.draft_reply",
    soft_time_limit=settings.INTERACTIVE_SOFT_TIME_LIMIT_S,
    time_limit=settings.INTERACTIVE_SOFT_TIME_LIMIT_S + 30,
    ignore_result=True,
)
def draft_reply(request_id: int) -> None:
    """A model-written draft of the reply a labeler is writing (either side of the conversation), streamed."""
    _run(request_id)


def _run(request_id: int) -> None:
    from models_service.sampling import run_request

    request = services.sampling_request_claim(request_id=request_id, worker=_worker_name())
    if request is not None:  # None: a redelivered message whose request another worker ran
        run_request(request)


@shared_task(name="models_service.tasks.reap_sampling_requests", ignore_result=True, soft_time_limit=60)
def reap_sampling_requests() -> int:
    return services.sampling_requests_reap(
        older_than_s=settings.SAMPLING_SOFT_TIME_LIMIT_S + 120,
        interactive_older_than_s=services.interactive_lost_after_s(),
    )


@shared_task(name="models_service.tasks.score_rankings", ignore_result=True, soft_time_limit=600, time_limit=660)
def score_rankings(limit: int = 400) -> int:
    """Score ranked replies with the active reward model, for the labeler-agreement figures on the ops page."""
    from models_service.scoring import score_rankings_with_active_model

    return score_rankings_with_active_model(limit=limit)
