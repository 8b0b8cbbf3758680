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
import logging
import shutil
import threading
import traceback
import uuid
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import close_old_connections, connection, transaction

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
    the reward model on the newest SFT (or base), PPO from the newest SFT against the newest reward model."""
    policy = ModelVersion.Kind.POLICY
    optimised = run.kind in TrainingRun.POLICY_KINDS
    if run.base_model is None and optimised:
        sft = newest_ready(policy, ModelVersion.Stage.SFT, ModelVersion.Stage.BASE)
        run.base_model = loop.policy_start(run.kind, sft) if sft is not None else None
    if run.base_model is None:
        stages = (
            (ModelVersion.Stage.BASE,)
            if run.kind == TrainingRun.Kind.SFT
            else (
                ModelVersion.Stage.SFT,
                ModelVersion.Stage.BASE,
            )
        )
        run.base_model = newest_ready(policy, *stages)
    if optimised and run.reward_model is None:
        run.reward_model = newest_ready(ModelVersion.Kind.REWARD, ModelVersion.Stage.RM)
    if run.base_model is None:
        raise TrainingFailed("There is no policy to start from: run `manage.py prepare_default_model` first.")
    if run.kind in (TrainingRun.Kind.PPO, TrainingRun.Kind.RLOO) and run.reward_model is None:
        raise TrainingFailed(f"{run.get_kind_display()} needs a reward model: train one first.")
    TrainingRun.objects.filter(pk=run.pk).update(base_model=run.base_model, reward_model=run.reward_model)
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
    TrainingRun.objects.filter(pk=run.pk).update(library_versions=library_versions())
    try:
        run = resolve_inputs(run)
        progress.message(f"{run.get_kind_display()} run #{run.pk} on {worker or 'a worker'}, from {run.base_model}")
        result, stage, kind, snapshot = TRAINERS[run.kind](run, staging, progress, reporter)
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


def _sft(run: TrainingRun, staging: Path, progress: Progress, reporter: RunReporter):
    from ml.sft import SFTConfig

    config = config_from(SFTConfig, {**settings.TRAINING_SFT_DEFAULTS, **run.config})
    with data_snapshot():
        data = datasets.build_sft(
            minimum_train=settings.TRAINING_MIN_DEMONSTRATIONS, minimum_validation=1, limit=run.config.get("limit")
        )
        reporter.snapshot = {"demonstrations": data.snapshot("message_id"), "config": config.__dict__}
        progress.flush(force=True)
        mark_used_in_training(message_ids=[e.message_id for e in data.train + data.validation])
    result = train(
        "sft",
        config,
        launch=launch(),
        train_chats=[e.chat for e in data.train],
        validation_chats=[e.chat for e in data.validation],
        base_dir=local_dir(run.base_model),
        output_dir=staging,
        progress=progress,
    )
    return result, ModelVersion.Stage.SFT, ModelVersion.Kind.POLICY, reporter.snapshot


def _rm(run: TrainingRun, staging: Path, progress: Progress, reporter: RunReporter):
    from ml.reward import Ranked, RewardConfig

    config = config_from(RewardConfig, {**settings.TRAINING_RM_DEFAULTS, **run.config})
    with data_snapshot():
        data = datasets.build_rankings(minimum_train=settings.TRAINING_MIN_RANKINGS, minimum_validation=0)
        imported = [e for e in data.validation if e.dataset.startswith("hh-rlhf")]
        labeled = [e for e in data.validation if not e.dataset.startswith("hh-rlhf")]
        holdout = imported[: settings.TRAINING_RM_HOLDOUT_PAIRS]
        validation = labeled or holdout
        demos = datasets.build_sft(minimum_train=0, minimum_validation=0, limit=settings.TRAINING_RM_NORMALISE_ON)
        reporter.snapshot = {
            "rankings": data.snapshot("ranking_id"),
            "validation_source": "labelers" if labeled else "imported HH-RLHF (no labeler rankings in validation)",
            "holdout_ranking_ids": [e.ranking_id for e in holdout],
            "normalised_on_demonstration_ids": [e.message_id for e in demos.train],
            "config": config.__dict__,
        }
        progress.flush(force=True)
        mark_used_in_training(ranking_ids=[e.ranking_id for e in data.train + data.validation])

    def ranked(examples):
        return [Ranked(e.context, e.candidates, e.ranks) for e in examples]

    result = train(
        "rm",
        config,
        launch=launch(),
        train=ranked(data.train),
        validation=ranked(validation),
        base_dir=local_dir(run.base_model),
        output_dir=staging,
        holdout=ranked(holdout),
        demonstrations=[(e.chat[:-1], e.chat[-1]["content"]) for e in demos.train],
        progress=progress,
    )
    return result, ModelVersion.Stage.RM, ModelVersion.Kind.REWARD, reporter.snapshot


def _rollout_config_and_prompts(run: TrainingRun, config_class, defaults: dict):
    """The config of a path that samples rollouts (PPO, RLOO) and the training prompts it samples for.

    Rollouts run at the temperature the policy will serve at (and the gate samples at), unless a config says
    otherwise: a policy tuned for T = 1 can fall apart at a lower serving temperature."""
    overrides = {k: v for k, v in run.config.items() if k != "prompts_limit"}
    serving = {"temperature": settings.SAMPLING_TEMPERATURE} if settings.SAMPLING_TEMPERATURE > 0 else {}
    config = config_from(config_class, {**serving, **defaults, **overrides})
    prompts = datasets.build_prompts(
        minimum=settings.TRAINING_MIN_PROMPTS, limit=run.config.get("prompts_limit", settings.TRAINING_PPO_PROMPTS)
    )
    return config, prompts


def _ppo(run: TrainingRun, staging: Path, progress: Progress, reporter: RunReporter):
    from ml.ppo import PPOConfig, train_ppo

    with data_snapshot():
        config, prompts = _rollout_config_and_prompts(run, PPOConfig, settings.TRAINING_PPO_DEFAULTS)
        ptx = []
        if config.ptx_coef:
            ptx = datasets.build_sft(minimum_train=1, minimum_validation=0, limit=settings.TRAINING_PPO_PROMPTS).train
        reporter.snapshot = {
            "prompt_message_ids": [p.message_id for p in prompts],
            "prompt_revisions": {str(p.message_id): p.revision for p in prompts},
            "prompts": len(prompts),
            "ptx_demonstration_ids": [e.message_id for e in ptx],
            "reward_model": run.reward_model.name,
            "config": config.__dict__,
        }
        progress.flush(force=True)
        mark_used_in_training(message_ids=[p.message_id for p in prompts] + [e.message_id for e in ptx])
    result = train_ppo(
        config,
        prompts=[p.chat for p in prompts],
        policy_dir=local_dir(run.base_model),
        reward_dir=local_dir(run.reward_model),
        output_dir=staging,
        ptx_examples=[e.chat for e in ptx] or None,
        progress=progress,
    )
    return result, ModelVersion.Stage.PPO, ModelVersion.Kind.POLICY, reporter.snapshot


def _dpo(run: TrainingRun, staging: Path, progress: Progress, reporter: RunReporter):
    """Iterative DPO: the rankings of candidates sampled by the starting policy (or its ancestors) that no earlier
    DPO round trained on; the reference is the starting policy."""
    from ml.dpo import DPOConfig, train_dpo
    from ml.reward import Ranked

    config = config_from(DPOConfig, {**settings.TRAINING_DPO_DEFAULTS, **run.config})
    earlier = set()
    for snapshot in TrainingRun.objects.filter(
        kind=TrainingRun.Kind.DPO, status=TrainingRun.Status.SUCCEEDED
    ).values_list("data_snapshot", flat=True):
        used = snapshot.get("rankings", {})
        earlier.update(used.get("train_ids", []) + used.get("validation_ids", []))
    lineage = [v.pk for v in run.base_model.lineage]
    with data_snapshot():
        data = datasets.build_rankings(
            minimum_train=settings.TRAINING_MIN_RANKINGS,
            minimum_validation=0,
            sampled_by=lineage,
            exclude_ids=earlier,
            stage="DPO (rankings of this policy's samples or its ancestors' that no earlier round trained on)",
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
        progress.flush(force=True)
        mark_used_in_training(ranking_ids=[e.ranking_id for e in data.train + data.validation])

    def ranked(examples):
        return [Ranked(e.context, e.candidates, e.ranks) for e in examples]

    result = train_dpo(
        config,
        ranked(data.train),
        ranked(data.validation),
        policy_dir=local_dir(run.base_model),
        output_dir=staging,
        holdout=ranked(holdout),
        progress=progress,
    )
    return result, ModelVersion.Stage.DPO, ModelVersion.Kind.POLICY, reporter.snapshot


def _rloo(run: TrainingRun, staging: Path, progress: Progress, reporter: RunReporter):
    from ml.rloo import RLOOConfig, train_rloo

    with data_snapshot():
        config, prompts = _rollout_config_and_prompts(run, RLOOConfig, settings.TRAINING_RLOO_DEFAULTS)
        reporter.snapshot = {
            "prompt_message_ids": [p.message_id for p in prompts],
            "prompt_revisions": {str(p.message_id): p.revision for p in prompts},
            "prompts": len(prompts),
            "reward_model": run.reward_model.name,
            "config": config.__dict__,
        }
        progress.flush(force=True)
        mark_used_in_training(message_ids=[p.message_id for p in prompts])
    result = train_rloo(
        config,
        prompts=[p.chat for p in prompts],
        policy_dir=local_dir(run.base_model),
        reward_dir=local_dir(run.reward_model),
        output_dir=staging,
        progress=progress,
    )
    return result, ModelVersion.Stage.RLOO, ModelVersion.Kind.POLICY, reporter.snapshot


TRAINERS = {
    TrainingRun.Kind.SFT: _sft,
    TrainingRun.Kind.RM: _rm,
    TrainingRun.Kind.PPO: _ppo,
    TrainingRun.Kind.DPO: _dpo,
    TrainingRun.Kind.RLOO: _rloo,
}
