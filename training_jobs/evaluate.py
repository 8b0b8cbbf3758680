"""The automatic evaluation of a candidate policy, on the training worker (imports torch).

On held-out prompts (conversations no stage ever trained on), the candidate and the serving policy each reply
once with the production sampling parameters and a fixed seed. Reported: the mean reward-model score of each,
the KL of each from the candidate's SFT policy (the mean over replies of sum log pi(y) - log pi_SFT(y) on the
sampled tokens), the mean reply length, and replies side by side. Then blind A/B comparison tasks are created
(ranking tasks with K = 2, one reply from each policy, shown in a per-labeler random order) and the gate decides.
Models are loaded one at a time, so the evaluation needs the memory of one model plus the reward model.
"""

import gc
import logging
import random
import secrets

from config import stages
from labeling import splits
from ml.generation import sample_completions
from ml.scoring import reply_logprob_sums, score_pairs
from models_service.loading import load_version
from models_service.models import ModelVersion
from models_service.sampling import serving_params
from training_jobs import datasets, services
from training_jobs.models import Evaluation, LoopSettings

logger = logging.getLogger(__name__)
SIDE_BY_SIDE = 12


def reference_of(version: ModelVersion) -> ModelVersion:
    """The SFT policy a version descends from (itself if it is one); the base if there is no SFT ancestor."""
    for ancestor in reversed(version.lineage):
        if ancestor.stage == stages.SFT:
            return ancestor
    return version.lineage[0]


def _sample(version: ModelVersion, chats, params):
    loaded = load_version(version, for_inference=True)
    groups, _ = sample_completions(loaded.model, loaded.tokenizer, chats, k=1, params=params)
    completions = [g[0] for g in groups]
    own = reply_logprob_sums(loaded.model, loaded.tokenizer, chats, [c.token_ids for c in completions])
    del loaded
    gc.collect()
    return completions, own


def run_evaluation(evaluation_id: int) -> str | None:
    """Evaluate a queued evaluation to the end; returns its final status (None if another worker has it)."""
    evaluation = services.evaluation_claim(evaluation_id=evaluation_id)
    if evaluation is None:
        return None
    from training_jobs.runner import CoresBusy, heartbeat_interval_s

    try:
        with CoresBusy(f"evaluation-{evaluation_id}", heartbeat_interval_s()):
            _evaluate(evaluation, LoopSettings.load())
    except Exception as exc:
        logger.exception("evaluation %s failed", evaluation_id)
        services.evaluation_fail(evaluation_id=evaluation_id, error=f"{type(exc).__name__}: {exc}")
        return Evaluation.Status.FAILED
    services.evaluation_decide(evaluation=evaluation)
    return Evaluation.Status.DONE


def draw(settings: LoopSettings) -> tuple[list, int]:
    """This evaluation's held-out prompts and sampling seed, drawn afresh from a secret source (recorded in its
    metrics and prompt_ids, so that it can be repeated): a baseline evaluated again gives other replies to other
    prompts than last round, so that a labeler who voted then cannot recognise it in a blind A/B."""
    seed = secrets.randbits(31)
    return held_out_prompts(settings, seed), seed


def held_out_prompts(settings: LoopSettings, seed: int) -> list:
    """`settings.eval_prompts` held-out prompts drawn with `seed` (all of them when there are no more)."""
    prompts = datasets.build_prompts(minimum=1, split=splits.HOLDOUT)
    if len(prompts) > settings.eval_prompts:
        prompts = sorted(random.Random(seed).sample(prompts, settings.eval_prompts), key=lambda p: p.message_id)
    return prompts


def _evaluate(evaluation: Evaluation, settings: LoopSettings) -> None:
    prompts, seed = draw(settings)
    chats = [p.chat for p in prompts]
    params = serving_params(max_new_tokens=settings.eval_max_new_tokens, seed=seed)
    reference = reference_of(evaluation.candidate)
    arms = {"candidate": evaluation.candidate}
    if evaluation.baseline is not None:
        arms["baseline"] = evaluation.baseline
    sampled = {name: _sample(version, chats, params) for name, version in arms.items()}

    loaded = load_version(reference, for_inference=True)
    for name, (completions, _) in sampled.items():
        sampled[name] += (
            reply_logprob_sums(loaded.model, loaded.tokenizer, chats, [c.token_ids for c in completions]),
        )
    del loaded
    gc.collect()

    scores = {}
    if evaluation.reward_model is not None:
        rm = load_version(evaluation.reward_model, for_inference=True)
        for name, (completions, *_rest) in sampled.items():
            scores[name] = score_pairs(rm.model, rm.tokenizer, [(c, x.text) for c, x in zip(chats, completions)])
        del rm
        gc.collect()

    metrics = {
        "prompts": len(chats),
        "prompt_draw_seed": seed,
        "reference": reference.name,
        "sampling": params.as_dict(),
    }
    for name, (completions, own, ref) in sampled.items():
        metrics[name] = {
            "model": arms[name].name,
            "rm_score": sum(scores[name]) / len(chats) if name in scores else None,
            "kl": sum(o - r for o, r in zip(own, ref)) / len(chats),
            "length": sum(len(c.token_ids) for c in completions) / len(chats),
            "finished": sum(c.finished for c in completions) / len(chats),
        }
    if "baseline" in metrics and metrics["candidate"]["rm_score"] is not None:
        metrics["rm_gain"] = metrics["candidate"]["rm_score"] - metrics["baseline"]["rm_score"]
        lengths = {name: [len(c.token_ids) for c in sampled[name][0]] for name in ("candidate", "baseline")}
        metrics.update(
            paired_figures(scores["candidate"], scores["baseline"], lengths["candidate"], lengths["baseline"])
        )
    elif "baseline" not in metrics:
        metrics["rm_gain"] = None
    samples = [
        {
            "prompt": chats[i][-1]["content"],
            **{name: sampled[name][0][i].text for name in sampled},
            **{f"{name}_score": scores[name][i] for name in scores},
        }
        for i in range(min(SIDE_BY_SIDE, len(chats)))
    ]
    comparisons = []
    if "baseline" in sampled and settings.human_comparisons:
        comparisons = [
            (prompt.message_id, {arm: sampled[arm][0][i] for arm in ("candidate", "baseline")})
            for i, prompt in enumerate(prompts[: settings.human_comparisons])
        ]
    services.evaluation_record(
        evaluation,
        metrics=metrics,
        samples=samples,
        prompt_ids=[p.message_id for p in prompts],
        reference=reference,
        comparisons=comparisons,
        votes_per_labeler=settings.votes_per_labeler,
        params_seed=seed,
    )
    evaluation.refresh_from_db()


def paired_figures(candidate: list[float], baseline: list[float], candidate_len: list[int], baseline_len: list[int]):
    """Per held-out prompt, the candidate's reply against the baseline's: the reward model's win rate (ties count
    half), and the score gain left once length is accounted for (both arms' scores regressed on reply length
    together; the gain of the residuals). A gain that vanishes then came from length alone."""
    n = len(candidate)
    wins = sum(1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(candidate, baseline, strict=True))
    scores, lengths = [*candidate, *baseline], [float(x) for x in [*candidate_len, *baseline_len]]
    mean_length, mean_score = sum(lengths) / len(lengths), sum(scores) / len(scores)
    spread = sum((x - mean_length) ** 2 for x in lengths)
    slope = (
        sum((x - mean_length) * (y - mean_score) for x, y in zip(lengths, scores, strict=True)) / spread
        if spread
        else 0.0
    )
    residuals = [y - slope * (x - mean_length) for x, y in zip(lengths, scores, strict=True)]
    return {
        "rm_win_rate": wins / n if n else None,
        "rm_gain_length_controlled": (sum(residuals[:n]) - sum(residuals[n:])) / n if n else None,
        "rm_score_per_token": slope,
    }
