"""The worker side of sampling: load the active policy, generate, and hand the text to the services.

Worker processes only (imports torch through generation and loading).
"""

import hashlib
import logging
import time
from pathlib import Path

from django.conf import settings

from ml.generation import SamplingParams, sample_completions
from models_service import services
from models_service.loading import active_holder
from models_service.models import ModelVersion, SamplingRequest

logger = logging.getLogger(__name__)


def serving_params(**overrides) -> SamplingParams:
    """The sampling parameters the product serves with (SAMPLING_* settings), with `overrides`."""
    values = {
        "temperature": settings.SAMPLING_TEMPERATURE,
        "top_p": settings.SAMPLING_TOP_P,
        "max_new_tokens": settings.SAMPLING_MAX_NEW_TOKENS,
        "seed": settings.SAMPLING_SEED,
    }
    return SamplingParams(**{**values, **overrides})


def batch_seed(requests: list[SamplingRequest]) -> int:
    """A seed per batch, derived from the configured seed and the requests, so batches differ but a batch can
    be reproduced from what is recorded on its messages."""
    key = f"{settings.SAMPLING_SEED}:" + ",".join(str(r.pk) for r in requests)
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def _chat(request: SamplingRequest) -> list[dict]:
    from labeling.selectors import message_thread, thread_as_chat

    chat = thread_as_chat(message_thread(request.context))
    if request.purpose == SamplingRequest.Purpose.DRAFT and request.assignment.task.kind == "write_user_reply":
        # A draft of the user's next message: the model plays the user by answering the conversation with the
        # two roles swapped (its "assistant" turn is then the user's).
        swap = {"user": "assistant", "assistant": "user"}
        chat = [{**turn, "role": swap.get(turn["role"], turn["role"])} for turn in chat]
    return chat


STREAM_INTERVAL_S = 0.25  # how often a streamed reply's text is written for the page that shows it


def _streamer(request: SamplingRequest, tokenizer):
    """on_token for sample_completions: write the text so far on the request, at once for the first token and
    then at most every STREAM_INTERVAL_S (each write is one UPDATE of one row)."""
    last = [None]

    def on_token(tokens: list[int]) -> None:
        now = time.monotonic()
        if last[0] is not None and now - last[0] < STREAM_INTERVAL_S:
            return
        last[0] = now
        text = tokenizer.decode(tokens, skip_special_tokens=True).replace("\x00", "\ufffd").strip()
        services.sampling_request_progress(request_id=request.pk, text=text)

    return on_token


def _replies(completions, params: SamplingParams, stats, loaded) -> list[services.SampledReply]:
    return [
        services.SampledReply(
            text=c.text,
            params={
                **params.as_dict(),
                "row": c.row,
                "finished": c.finished,
                "new_tokens": len(c.token_ids),
                "truncated_context": bool(stats.truncated_contexts),
                "device": str(loaded.device),
                "dtype": str(loaded.dtype).removeprefix("torch."),
            },
        )
        for c in completions
    ]


def pool_params(request: SamplingRequest, seed: int) -> SamplingParams:
    """The serving parameters for a context's first candidates; a re-sample of a context whose ranking all tied
    samples at SAMPLING_RESAMPLE_TEMPERATURE (its more candidates are in the request's k)."""
    if request.attempt > 1:
        return serving_params(seed=seed, temperature=settings.SAMPLING_RESAMPLE_TEMPERATURE)
    return serving_params(seed=seed)


def _groups(requests: list[SamplingRequest]) -> list[list[SamplingRequest]]:
    """The batch's requests by how they are sampled (k and temperature): one padded batch each."""
    groups: dict[tuple, list[SamplingRequest]] = {}
    for request in requests:
        groups.setdefault((request.k, request.attempt > 1), []).append(request)
    return list(groups.values())


def _selecting() -> bool:
    """Active selection runs once a reward model serves (it is what tells candidates apart as the labelers would),
    on the native backend (the vLLM one offers every context it samples)."""
    from models_service.selectors import active_version

    if not settings.SAMPLING_ACTIVE_SELECTION or settings.SAMPLING_SELECT_FROM < 2:
        return False
    return settings.SAMPLING_BACKEND == "native" and active_version(ModelVersion.Kind.REWARD) is not None


def informativeness(scores: list[float]) -> float:
    """How far apart the reward model puts a context's candidates (the spread of its scores): the wider, the more
    likely the labelers see a difference too, where a ranking that ties every candidate would teach nothing."""
    return max(scores) - min(scores) if scores else 0.0


def _select(sampled: list[tuple], keep: int) -> tuple[list[tuple], list[tuple], str]:
    """Score every context's candidates with the serving reward model; the `keep` most informative first."""
    from ml.scoring import score_pairs

    reward = active_holder(ModelVersion.Kind.REWARD).get()
    rated = []
    for request, chat, replies, params in sampled:
        scores = score_pairs(reward.model, reward.tokenizer, [(chat, r.text) for r in replies])
        rated.append((informativeness(scores), request, chat, replies, params))
    rated.sort(key=lambda item: -item[0])
    return rated[:keep], rated[keep:], reward.version_name


def fill_pool_once(*, worker: str = "") -> dict:
    """Claim one batch of contexts, sample K candidates for each in one padded batch (one per k and temperature
    when re-sampled contexts are among them), create the ranking tasks. With active selection (a reward model
    serves), SAMPLING_SELECT_FROM contexts are sampled for each task offered and the others are passed over.
    While a run trains, the pool is filled only to SAMPLING_POOL_WHILE_TRAINING (selectors.pool_target).

    Returns what was done. A failure marks the batch's requests failed with the error and re-raises.
    """
    select_from = settings.SAMPLING_SELECT_FROM if _selecting() else 1
    from models_service.selectors import pool_target

    requests = services.pool_claim(
        target=pool_target(),
        batch_contexts=settings.SAMPLING_BATCH_CONTEXTS,
        k=settings.SAMPLING_K,
        worker=worker,
        select_from=select_from,
    )
    if not requests:
        return {"contexts": 0}
    if settings.SAMPLING_BACKEND == "vllm":
        return _fill_from_server(requests)
    tokens = seconds = 0.0
    passed = []
    try:
        loaded = active_holder(ModelVersion.Kind.POLICY).get()
        version = ModelVersion.objects.get(pk=loaded.version_id)
        sampled = []
        for group in _groups(requests):
            params = pool_params(group[0], batch_seed(group))
            chats = [_chat(r) for r in group]
            grouped, stats = sample_completions(loaded.model, loaded.tokenizer, chats, k=group[0].k, params=params)
            tokens, seconds = tokens + stats.generated_tokens, seconds + stats.wall_s
            for request, chat, completions in zip(group, chats, grouped, strict=True):
                sampled.append((request, chat, _replies(completions, params, stats, loaded), params))
        offered = [(None, *item) for item in sampled]
        if select_from > 1:
            offered, passed, judge = _select(sampled, keep=-(-len(sampled) // select_from))
        for score, request, _, replies, _ in offered:
            selection = {"reward_model": judge, "spread": round(score, 4)} if score is not None else None
            services.pool_complete(request=request, version=version, replies=replies, selection=selection)
        for score, request, *_ in passed:
            services.pool_pass_over(
                request=request, version=version, note=f"{judge} spread {score:.4f}, below the offered contexts'"
            )
    except Exception as exc:
        for request in requests:
            services.sampling_request_fail(request=request, error=f"{type(exc).__name__}: {exc}")
        raise
    resampled = sum(r.attempt > 1 for r in requests)
    logger.info(
        "sampled %d contexts (%d re-sampled after a tie, %d passed over) with %s: %d tokens in %.1f s",
        len(requests),
        resampled,
        len(passed),
        version.name,
        tokens,
        seconds,
    )
    return {
        "contexts": len(requests) - len(passed),
        "resampled": resampled,
        "passed_over": len(passed),
        "k": settings.SAMPLING_K,
        "model_version": version.name,
        "generated_tokens": int(tokens),
        "seconds": round(seconds, 2),
    }


def serve_on(backend, version: ModelVersion) -> str:
    """Make the server serve `version` without a restart where it can: already served; or a LoRA policy whose
    parent the server runs as its weights, whose adapter the server is asked to load. Otherwise BackendError with
    what to do. Returns what was done."""
    from ml.modeling import ADAPTER_DIR
    from models_service.artifact_store import local_dir
    from models_service.openai_backend import BackendError

    if version.name in backend.served_models():
        return "served"
    bases = backend.base_models()
    parent = version.parent.name if version.parent_id else None
    if parent is None or parent not in bases:
        raise BackendError(
            f"the sampling server runs {', '.join(bases) or 'nothing'}; the active policy {version.name} is not "
            f"served and is no adapter over one of them: restart it on {version.name} "
            f"(vllm serve <its folder> --served-model-name {version.name})"
        )
    adapter = local_dir(version) / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise BackendError(
            f"{version.name} is full weights, not a LoRA adapter over {parent}: restart the sampling server on it "
            f"(vllm serve <its folder> --served-model-name {version.name})"
        )
    seen_at = adapter
    if settings.SAMPLING_VLLM_ARTIFACTS_DIR:  # the server sees this host's ARTIFACTS_DIR elsewhere
        seen_at = Path(settings.SAMPLING_VLLM_ARTIFACTS_DIR) / adapter.relative_to(Path(settings.ARTIFACTS_DIR))
    answer = backend.load_adapter(version.name, str(seen_at))
    if version.name not in backend.served_models():
        raise BackendError(f"the sampling server did not load {version.name}'s adapter: {answer[:300]}")
    logger.info("the sampling server loaded %s as an adapter over %s: %s", version.name, parent, answer[:200])
    return "loaded adapter"


def _fill_from_server(requests: list[SamplingRequest]) -> dict:
    """fill_pool_once through an OpenAI-compatible server (SAMPLING_BACKEND=vllm): the server samples, the
    candidates are recorded under the active version, which the server must be serving (checked first)."""
    from models_service.openai_backend import OpenAICompatibleBackend
    from models_service.selectors import active_version

    try:
        version = active_version(ModelVersion.Kind.POLICY)
        if version is None:
            raise RuntimeError("No active policy model.")
        if not settings.SAMPLING_VLLM_URL:
            raise RuntimeError("SAMPLING_BACKEND is vllm but SAMPLING_VLLM_URL is not set.")
        backend = OpenAICompatibleBackend(settings.SAMPLING_VLLM_URL, api_key=settings.SAMPLING_VLLM_API_KEY)
        serve_on(backend, version)
        for group in _groups(requests):
            params = pool_params(group[0], batch_seed(group))
            grouped = backend.sample(version.name, [_chat(r) for r in group], k=group[0].k, params=params)
            for request, completions in zip(group, grouped, strict=True):
                replies = [
                    services.SampledReply(
                        text=c.text,
                        params={
                            **params.as_dict(),
                            "row": c.row,
                            "finished": c.finished,
                            "new_tokens": c.new_tokens,
                            "backend": "vllm",
                            "finish_reason": c.finish_reason,
                        },
                    )
                    for c in completions
                ]
                services.pool_complete(request=request, version=version, replies=replies)
    except Exception as exc:
        for request in requests:
            services.sampling_request_fail(request=request, error=f"{type(exc).__name__}: {exc}")
        raise
    return {"contexts": len(requests), "k": settings.SAMPLING_K, "model_version": version.name, "backend": "vllm"}


def run_request(request: SamplingRequest) -> None:
    """A chat reply or a labeler's draft (k = 1, streamed as it is written), or chat alternatives (k new samples),
    on the interactive worker."""
    try:
        loaded = active_holder(ModelVersion.Kind.POLICY).get()
        version = ModelVersion.objects.get(pk=loaded.version_id)
        streamed = request.purpose in (SamplingRequest.Purpose.CHAT, SamplingRequest.Purpose.DRAFT)
        max_new = settings.CHAT_MAX_NEW_TOKENS if streamed else None
        params = serving_params(seed=batch_seed([request]), **({"max_new_tokens": max_new} if max_new else {}))
        grouped, stats = sample_completions(
            loaded.model,
            loaded.tokenizer,
            [_chat(request)],
            k=request.k,
            params=params,
            on_token=_streamer(request, loaded.tokenizer) if streamed else None,
        )
        replies = _replies(grouped[0], params, stats, loaded)
        if request.purpose == SamplingRequest.Purpose.CHAT:
            services.chat_complete(request=request, version=version, reply=replies[0])
        elif request.purpose == SamplingRequest.Purpose.DRAFT:
            services.draft_complete(request=request, version=version, reply=replies[0])
        else:
            services.alternatives_complete(request=request, version=version, replies=replies)
    except services.RequestNotRunning as exc:  # finished late: the request already ended (reaped), nothing to do
        logger.warning("dropped a late result: %s", exc)
    except Exception as exc:
        services.sampling_request_fail(request=request, error=f"{type(exc).__name__}: {exc}")
        raise
