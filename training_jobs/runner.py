"""Runs a TrainingRun on the training worker: claim it, build its data, call the trainer, register the model.

The trainer writes into a staging folder; only a complete checkpoint is moved into place and registered as a
ModelVersion, so a failed, cancelled or killed run never leaves a registered half-written artifact. A
successful run's model is registered but not activated: the loop (evaluation gate) decides that.

Liveness: a heartbeat thread stamps the run every TRAINING_HEARTBEAT_TIMEOUT_S / 6 seconds for as long as the
worker process lives, whatever the trainer is doing (a long validation pass or save reports no step), so only a
dead worker goes silent long enough to be reaped. Registration and the run's end are one transaction on the run's
locked row: a run that was reaped (or cancelled) meanwhile registers nothing and leaves nothing behind.

Worker processes only (imports torch through the trainers).
"""

import contextlib
import importlib
import logging
import shutil
import threading
import traceback
import uuid
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import close_old_connections, connection, transaction

from config import stages
from labeling.services import lock_for_training_snapshot, mark_used_in_training
from ml.launch import Launch, train
from ml.runs import Cancelled, Progress, TrainingFailed, config_from, library_versions
from models_service.artifact_store import local_dir
from models_service.models import ModelVersion
from models_service.selectors import active_version, newest_ready
from models_service.services import (
    model_version_activate,
    model_version_register,
    training_busy_clear,
    training_busy_mark,
)
from training_jobs import datasets, loop, services
from training_jobs.models import TrainingRun

logger = logging.getLogger(__name__)


def resolve_inputs(run: TrainingRun) -> TrainingRun:
    """Fill in the models a run starts from when it was queued without them: SFT from the newest base policy,
    the reward model on the newest SFT (or base), a policy step from where its path starts (loop.policy_start)
    with the newest reward model."""
    policy = ModelVersion.Kind.POLICY
    stage = stages.STAGES[run.kind]
    if run.base_model is None and stage.policy_step:
        sft = newest_ready(policy, stages.SFT, stages.BASE)
        run.base_model = loop.policy_start(run.kind, sft) if sft is not None else None
    if run.base_model is None:
        starts = (stages.BASE,) if run.kind == stages.SFT else (stages.SFT, stages.BASE)
        run.base_model = newest_ready(policy, *starts)
    if stage.policy_step and run.reward_model is None:
        run.reward_model = newest_ready(ModelVersion.Kind.REWARD, stages.RM)
    if run.base_model is None:
        raise TrainingFailed("There is no policy to start from: run `manage.py prepare_default_model` first.")
    if stage.needs_reward_model and run.reward_model is None:
        raise TrainingFailed(f"{stage.label} needs a reward model: train one first.")
    services.training_run_set_inputs(run_id=run.pk, base_model=run.base_model, reward_model=run.reward_model)
    return run


class RunReporter:
    """Bridges a trainer's Progress to the run's row: progress, series, log tail and heartbeat."""

    def __init__(self, run: TrainingRun):
        self.run_id = run.pk
        self.snapshot: dict | None = None
        self.gone = False

    def sink(self, progress: Progress) -> None:
        alive = services.training_run_report(
            run_id=self.run_id,
            step=progress.step,
            total=progress.total,
            series=progress.series,
            log=progress.log,
            data_snapshot=self.snapshot,
        )
        self.gone = not alive

    def should_stop(self) -> bool:
        return self.gone or services.training_run_cancel_requested(run_id=self.run_id)


class CoresBusy:
    """Tells the sampling workers that this worker's cores are busy (models_service.services.training_busy_mark:
    they keep the ranking pool small meanwhile), from a thread of its own every `interval_s` while the block
    runs, and that they are free when it ends."""

    def __init__(self, owner: str, interval_s: float):
        self.owner, self.interval_s = owner, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"busy-{owner}", daemon=True)

    def mark(self) -> None:
        training_busy_mark(owner=self.owner, seconds=3 * self.interval_s + 5)

    def beat(self) -> None:
        self.mark()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self.beat()
        finally:
            connection.close()

    def __enter__(self):
        self.mark()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        training_busy_clear(owner=self.owner)


class Heartbeat(CoresBusy):
    """Also stamps the run's heartbeat on each beat (the worker process is alive), on the thread's own database
    connection, closed when it stops."""

    def __init__(self, run_id: int, interval_s: float):
        super().__init__(f"run-{run_id}", interval_s)
        self.run_id = run_id

    def beat(self) -> None:
        self.mark()
        try:
            close_old_connections()
            services.training_run_heartbeat(run_id=self.run_id)
        except Exception:  # a database blip: the next beat tries again; the reaper allows several
            logger.warning("heartbeat of run %s failed", self.run_id, exc_info=True)


def heartbeat_interval_s() -> float:
    return max(settings.TRAINING_HEARTBEAT_TIMEOUT_S / 6, 0.1)


def execute(run_id: int, *, worker: str = "") -> str | None:
    """Run one training run to its end. Returns its final status, or None if another worker had it."""
    run = services.training_run_claim(run_id=run_id, worker=worker)
    if run is None:
        logger.info("run %s is not queued; nothing to do", run_id)
        return None
    with Heartbeat(run.pk, heartbeat_interval_s()):
        return _execute(run, worker)


def _register(run: TrainingRun, staging: Path, result, stage: str, kind: str, progress: Progress) -> str:
    """Move the complete checkpoint into place, register it and end the run, in one transaction on the run's
    locked row: a run that is no longer running (reaped as lost, or cancelled) registers nothing."""
    with transaction.atomic():
        current = TrainingRun.objects.select_for_update().get(pk=run.pk)
        if current.status != TrainingRun.Status.RUNNING:
            logger.warning("run %s ended as %s while it was training: nothing registered", run.pk, current.status)
            return current.status
        final = Path(settings.ARTIFACTS_DIR) / "models" / f"{kind}-{stage}-run{run.pk}-{uuid.uuid4().hex[:6]}"
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(final)  # the checkpoint appears complete or not at all
        try:
            version = model_version_register(
                kind=kind,
                stage=stage,
                artifact_dir=final,
                parent=run.base_model,
                training_run=run,
                source=f"training run #{run.pk}",
                metrics=result.metrics,
            )
            if kind == ModelVersion.Kind.REWARD and active_version(ModelVersion.Kind.REWARD) is None:
                model_version_activate(version=version, reason="the first reward model", automatic=True)
                progress.message(f"registered {version.name}, the first reward model: it scores from now on")
            else:
                progress.message(f"registered {version.name} (not serving: the loop decides)")
            progress.flush(force=True)
            summary = {**result.metrics, "model_version": version.pk, "model_version_name": version.name}
            services.training_run_finish(run_id=run.pk, status=TrainingRun.Status.SUCCEEDED, summary=summary)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)  # the transaction rolls back: no folder without its row
            raise
    return TrainingRun.Status.SUCCEEDED


def _execute(run: TrainingRun, worker: str) -> str:
    reporter = RunReporter(run)
    progress = Progress(
        sink=reporter.sink, should_stop=reporter.should_stop, interval_s=settings.TRAINING_REPORT_INTERVAL_S
    )
    staging = services.staging_dir(run)
    shutil.rmtree(staging, ignore_errors=True)
    services.training_run_record_versions(run_id=run.pk, versions=library_versions())
    try:
        run = resolve_inputs(run)
        progress.message(f"{run.get_kind_display()} run #{run.pk} on {worker or 'a worker'}, from {run.base_model}")
        result, stage, kind, snapshot = _train_stage(run, staging, progress, reporter)
        return _register(run, staging, result, stage, kind, progress)
    except Cancelled:
        progress.message("cancelled")
        progress.flush(force=True)
        services.training_run_finish(run_id=run.pk, status=TrainingRun.Status.CANCELLED, error="Cancelled.")
        return TrainingRun.Status.CANCELLED
    except (datasets.NotEnoughData, TrainingFailed, ValueError) as exc:
        return _fail(run, progress, str(exc))
    except SoftTimeLimitExceeded:
        return _fail(run, progress, f"The run hit the time limit of {settings.TRAINING_SOFT_TIME_LIMIT_S} s.")
    except Exception as exc:
        logger.exception("run %s failed", run.pk)
        progress.message(traceback.format_exc()[-4000:])
        return _fail(run, progress, f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fail(run: TrainingRun, progress: Progress, error: str) -> str:
    progress.message(f"failed: {error}")
    progress.flush(force=True)
    services.training_run_finish(run_id=run.pk, status=TrainingRun.Status.FAILED, error=error)
    return TrainingRun.Status.FAILED


# --- the stages ---


def launch() -> Launch | None:
    """How SFT and reward-model runs start: under `accelerate launch` when TRAINING_ACCELERATE_CONFIG names a
    config, else in this process (None)."""
    if not settings.TRAINING_ACCELERATE_CONFIG:
        return None
    return Launch(
        config_file=Path(settings.TRAINING_ACCELERATE_CONFIG),
        num_processes=settings.TRAINING_NUM_PROCESSES,
        poll_s=min(settings.TRAINING_REPORT_INTERVAL_S, 1.0),
    )


@contextlib.contextmanager
def data_snapshot():
    """A stage's read of its data set and its "used in training" mark, in one transaction that no edit of a text
    or a ranking can interleave with (labeling.services.lock_for_training_snapshot): what trains is exactly what
    the snapshot names, and frozen from then on."""
    with transaction.atomic():
        lock_for_training_snapshot()
        yield


def _by_name(reference: str):
    """ "module:name" -> the object (a stage's trainer or config class, config/stages.py)."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def _ranked(examples):
    from ml.reward import Ranked

    return [Ranked(e.context, e.candidates, e.ranks) for e in examples]


def _config(run: TrainingRun, stage: stages.Stage):
    """The stage's config: its defaults (TRAINING_STAGE_DEFAULTS), then the run's own. A stage that samples
    rollouts does so at the temperature the policy will serve at (and the gate samples at), unless a config says
    otherwise: a policy tuned for T = 1 can fall apart at a lower serving temperature."""
    overrides = {k: v for k, v in run.config.items() if k not in ("limit", "prompts_limit")}
    serving = {}
    if stage.reads == stages.PROMPTS and settings.SAMPLING_TEMPERATURE > 0:
        serving = {"temperature": settings.SAMPLING_TEMPERATURE}
    defaults = settings.TRAINING_STAGE_DEFAULTS.get(stage.name, stage.default_config)
    return config_from(_by_name(stage.config), {**serving, **defaults, **overrides})


# --- what each kind of stage reads (config/stages.py: `reads`) ---
# A reader runs inside data_snapshot(): it builds the data set, records what it read in reporter.snapshot, marks
# it used, and returns the trainer's keyword arguments besides the config, the folders and the progress.


def _read_demonstrations(run, config, reporter) -> dict:
    data = datasets.build_sft(
        minimum_train=settings.TRAINING_MIN_DEMONSTRATIONS, minimum_validation=1, limit=run.config.get("limit")
    )
    reporter.snapshot = {"demonstrations": data.snapshot("message_id"), "config": config.__dict__}
    mark_used_in_training(message_ids=[e.message_id for e in data.train + data.validation])
    return {"train_chats": [e.chat for e in data.train], "validation_chats": [e.chat for e in data.validation]}


def _read_rankings(run, config, reporter) -> dict:
    data = datasets.build_rankings(minimum_train=settings.TRAINING_MIN_RANKINGS, minimum_validation=0)
    imported = [e for e in data.validation if e.dataset.startswith("hh-rlhf")]
    labeled = [e for e in data.validation if not e.dataset.startswith("hh-rlhf")]
    holdout = imported[: settings.TRAINING_RM_HOLDOUT_PAIRS]
    demos = datasets.build_sft(minimum_train=0, minimum_validation=0, limit=settings.TRAINING_RM_NORMALISE_ON)
    reporter.snapshot = {
        "rankings": data.snapshot("ranking_id"),
        "validation_source": "labelers" if labeled else "imported HH-RLHF (no labeler rankings in validation)",
        "holdout_ranking_ids": [e.ranking_id for e in holdout],
        "normalised_on_demonstration_ids": [e.message_id for e in demos.train],
        "config": config.__dict__,
    }
    mark_used_in_training(ranking_ids=[e.ranking_id for e in data.train + data.validation])
    return {
        "train": _ranked(data.train),
        "validation": _ranked(labeled or holdout),
        "holdout": _ranked(holdout),
        "demonstrations": [(e.chat[:-1], e.chat[-1]["content"]) for e in demos.train],
    }


def _read_policy_rankings(run, config, reporter) -> dict:
    """The rankings of candidates sampled by the starting policy (or its ancestors) that no earlier run of this
    kind trained on (iterative DPO: each round learns from its own policy's samples)."""
    earlier = set()
    for snapshot in TrainingRun.objects.filter(kind=run.kind, status=TrainingRun.Status.SUCCEEDED).values_list(
        "data_snapshot", flat=True
    ):
        used = snapshot.get("rankings", {})
        earlier.update(used.get("train_ids", []) + used.get("validation_ids", []))
    lineage = [v.pk for v in run.base_model.lineage]
    label = stages.label(run.kind)
    data = datasets.build_rankings(
        minimum_train=settings.TRAINING_MIN_RANKINGS,
        minimum_validation=0,
        sampled_by=lineage,
        exclude_ids=earlier,
        stage=f"{label} (rankings of this policy's samples or its ancestors' that no earlier round trained on)",
    )
    holdout = datasets.build_rankings(minimum_train=0, minimum_validation=0, dataset_prefix="hh-rlhf").validation
    holdout = holdout[: settings.TRAINING_RM_HOLDOUT_PAIRS]
    reporter.snapshot = {
        "rankings": data.snapshot("ranking_id"),
        "sampled_by": lineage,
        "left_out_trained_before": len(earlier),
        "holdout_ranking_ids": [e.ranking_id for e in holdout],
        "reward_model": run.reward_model.name if run.reward_model else None,
        "config": config.__dict__,
    }
    mark_used_in_training(ranking_ids=[e.ranking_id for e in data.train + data.validation])
    return {"train": _ranked(data.train), "validation": _ranked(data.validation), "holdout": _ranked(holdout)}


def _read_prompts(run, config, reporter) -> dict:
    """Training prompts to sample rollouts for (and, for a config with `ptx_coef`, demonstrations for PPO-ptx)."""
    prompts = datasets.build_prompts(
        minimum=settings.TRAINING_MIN_PROMPTS, limit=run.config.get("prompts_limit", settings.TRAINING_PPO_PROMPTS)
    )
    ptx = []
    if getattr(config, "ptx_coef", 0):
        ptx = datasets.build_sft(minimum_train=1, minimum_validation=0, limit=settings.TRAINING_PPO_PROMPTS).train
    reporter.snapshot = {
        "prompt_message_ids": [p.message_id for p in prompts],
        "prompt_revisions": {str(p.message_id): p.revision for p in prompts},
        "prompts": len(prompts),
        **({"ptx_demonstration_ids": [e.message_id for e in ptx]} if hasattr(config, "ptx_coef") else {}),
        "reward_model": run.reward_model.name,
        "config": config.__dict__,
    }
    mark_used_in_training(message_ids=[p.message_id for p in prompts] + [e.message_id for e in ptx])
    arguments = {"prompts": [p.chat for p in prompts], "reward_dir": local_dir(run.reward_model)}
    if hasattr(config, "ptx_coef"):
        arguments["ptx_examples"] = [e.chat for e in ptx] or None
    return arguments


READERS = {
    stages.DEMONSTRATIONS: _read_demonstrations,
    stages.RANKINGS: _read_rankings,
    stages.POLICY_RANKINGS: _read_policy_rankings,
    stages.PROMPTS: _read_prompts,
}


def _train_stage(run: TrainingRun, staging: Path, progress: Progress, reporter: RunReporter):
    """Any stage: its config, its reader's data (one snapshot), its trainer; returns what _register needs."""
    stage = stages.STAGES[run.kind]
    config = _config(run, stage)
    with data_snapshot():
        arguments = READERS[stage.reads](run, config, reporter)
        progress.flush(force=True)
    model_dir = local_dir(run.base_model)
    if stage.launchable:  # ml/launch.py runs it here or under accelerate launch
        result = train(
            stage.name, config, launch=launch(), base_dir=model_dir, output_dir=staging, progress=progress, **arguments
        )
    else:
        trainer = _by_name(stage.trainer)
        result = trainer(config, policy_dir=model_dir, output_dir=staging, progress=progress, **arguments)
    return result, stage.name, stage.produces, reporter.snapshot
