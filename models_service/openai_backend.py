"""Sampling through an OpenAI-compatible server (vLLM's `vllm serve`, or any server with the same API), for the
ranking pool (SAMPLING_BACKEND=vllm): where a GPU and vLLM serve the policy, the sampling worker sends the pool's
contexts there instead of running its own decode loop.

The server must serve the active policy under the version's name (`vllm serve <ARTIFACTS_DIR>/<folder>
--served-model-name <version name>`): before sampling, the worker checks /v1/models and refuses, with the reason,
when the serving version is not there, so no candidate is ever recorded under the wrong version. The recorded
sampling parameters are the same as the native loop's, with `backend` and the server's `finish_reason`.

A promotion needs no restart where the new policy is a LoRA adapter over the model the server serves (PPO and
RLOO train LoRA adapters by default, over their parent version): the worker asks the server to load the adapter
(`/v1/load_lora_adapter`, vLLM started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) and samples it
under the version's name. A version of full weights (SFT, DPO) needs the server started on it.

Worker side (the sampling worker); HTTP through the standard library.
"""

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from ml.generation import SamplingParams


class BackendError(RuntimeError):
    pass


@dataclass
class ServedCompletion:
    text: str
    finished: bool  # the server stopped at EOS ("stop"), not at max_tokens ("length")
    row: int
    new_tokens: int | None
    finish_reason: str


@dataclass
class OpenAICompatibleBackend:
    base_url: str  # e.g. http://gpu-host:8000 (without /v1)
    api_key: str = ""
    timeout_s: float = 300.0

    def _request(self, path: str, body: dict | None = None, *, expect_json: bool = True):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.base_url.rstrip('/')}{path}", data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.load(response) if expect_json else response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise BackendError(f"{self.base_url}{path} answered {exc.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as exc:
            raise BackendError(f"{self.base_url}{path} could not be reached: {exc}") from None

    def models(self) -> list[dict]:
        """The server's models: {"id", and for a LoRA adapter "parent" (the model it applies to)}."""
        return list(self._request("/v1/models").get("data", []))

    def served_models(self) -> list[str]:
        return [model["id"] for model in self.models()]

    def base_models(self) -> list[str]:
        """The models the server runs as weights, not as adapters over another."""
        return [model["id"] for model in self.models() if not model.get("parent")]

    def load_adapter(self, name: str, path: str) -> str:
        """Load the LoRA adapter at `path` (as the server sees it) under `name`; the server answers in words."""
        return self._request("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, expect_json=False)

    def require_serving(self, version_name: str) -> None:
        served = self.served_models()
        if version_name not in served:
            raise BackendError(
                f"the sampling server serves {', '.join(served) or 'nothing'}, not the active policy {version_name}: "
                f"start it with --served-model-name {version_name} (or load that version) before sampling"
            )

    def sample(
        self, version_name: str, chats: list[list[dict]], *, k: int, params: SamplingParams
    ) -> list[list[ServedCompletion]]:
        """`k` completions per chat, from the server's chat endpoint (n = k, one request per chat)."""
        self.require_serving(version_name)
        grouped = []
        for index, chat in enumerate(chats):
            reply = self._request(
                "/v1/chat/completions",
                {
                    "model": version_name,
                    "messages": chat,
                    "n": k,
                    "temperature": params.temperature,
                    "top_p": params.top_p,
                    "max_tokens": params.max_new_tokens,
                    "seed": params.seed + index,
                },
            )
            choices = sorted(reply.get("choices", []), key=lambda c: c.get("index", 0))
            if len(choices) != k:
                raise BackendError(f"asked for {k} completions, the server returned {len(choices)}")
            grouped.append(
                [
                    ServedCompletion(
                        text=(choice.get("message", {}).get("content") or "").replace("\x00", "\ufffd").strip(),
                        finished=choice.get("finish_reason") == "stop",
                        row=index * k + n,
                        new_tokens=None,
                        finish_reason=str(choice.get("finish_reason")),
                    )
                    for n, choice in enumerate(choices)
                ]
            )
        return grouped
