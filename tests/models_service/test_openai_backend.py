"""Issue 18: the ranking pool sampled through an OpenAI-compatible server (the API `vllm serve` offers), against a
small stand-in server started here: what it samples is recorded under the active version with the parameters, a
promoted LoRA policy is loaded into the running server as an adapter over its parent, and a server that does not
serve the active version (and cannot load it) is refused with the reason."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from labeling.models import Message, Task, TaskKind
from models_service.models import SamplingRequest
from models_service.sampling import fill_pool_once
from tests.support.factories import ConversationFactory, MessageFactory


class StandIn(BaseHTTPRequestHandler):
    """vLLM's OpenAI-compatible API as far as the product uses it: models (adapters with their parent), chat
    completions with n, and loading a LoRA adapter at run time (refused unless the folder holds one)."""

    served = ["policy"]
    adapters: dict = {}  # name -> (parent, path)
    requests: list = []

    def log_message(self, *args):
        pass

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            models = [{"id": name, "object": "model", "root": name, "parent": None} for name in self.served]
            models += [
                {"id": name, "object": "model", "root": path, "parent": parent}
                for name, (parent, path) in self.adapters.items()
            ]
            self._send(200, {"object": "list", "data": models})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/v1/load_lora_adapter":
            StandIn.loads.append(body)
            if not (Path(body["lora_path"]) / "adapter_config.json").is_file():
                self._send(400, {"error": f"No adapter found at {body['lora_path']}"})
                return
            StandIn.adapters[body["lora_name"]] = (self.served[0], body["lora_path"])
            text = f"Success: LoRA adapter '{body['lora_name']}' added successfully.".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)
            return
        StandIn.requests.append(body)
        if body["model"] not in self.served and body["model"] not in self.adapters:
            self._send(404, {"error": f"The model `{body['model']}` does not exist."})
            return
        question = body["messages"][-1]["content"]
        choices = [
            {
                "index": n,
                "message": {"role": "assistant", "content": f"answer {n} to {question}"},
                "finish_reason": "stop" if n % 2 == 0 else "length",
            }
            for n in range(body["n"])
        ]
        self._send(200, {"object": "chat.completion", "model": body["model"], "choices": choices})


@pytest.fixture
def stand_in():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    StandIn.requests, StandIn.loads, StandIn.adapters = [], [], {}
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.django_db
def test_the_pool_is_sampled_by_the_server_that_serves_the_active_version(stand_in, tiny_policy, settings):
    server, url = stand_in
    StandIn.served = [tiny_policy.name]
    settings.SAMPLING_BACKEND, settings.SAMPLING_VLLM_URL = "vllm", url
    settings.SAMPLING_K, settings.SAMPLING_POOL_TARGET, settings.SAMPLING_BATCH_CONTEXTS = 3, 5, 2
    for i in range(2):
        MessageFactory(conversation=ConversationFactory(split="train"), text=f"prompt {i}")
    done = fill_pool_once()
    assert done["contexts"] == 2 and done["backend"] == "vllm"
    assert [r["n"] for r in StandIn.requests] == [3, 3] and all(
        r["model"] == tiny_policy.name for r in StandIn.requests
    )
    tasks = Task.objects.filter(kind=TaskKind.RANK_REPLIES)
    assert tasks.count() == 2
    candidates = Message.objects.filter(origin="model")
    assert candidates.count() == 6 and set(candidates.values_list("model_version", flat=True)) == {tiny_policy.pk}
    first = candidates.get(text=f"answer 0 to {candidates.first().parent.text}")
    assert first.sampling_params["backend"] == "vllm" and first.sampling_params["finished"] is True
    assert first.sampling_params["temperature"] == settings.SAMPLING_TEMPERATURE


@pytest.mark.django_db
def test_a_server_serving_another_version_is_refused_with_the_reason(stand_in, tiny_policy, settings):
    server, url = stand_in
    StandIn.served = ["policy-sft-v0"]
    settings.SAMPLING_BACKEND, settings.SAMPLING_VLLM_URL, settings.SAMPLING_K = "vllm", url, 2
    MessageFactory(conversation=ConversationFactory(split="train"), text="prompt")
    with pytest.raises(Exception, match=f"the active policy {tiny_policy.name} is not served"):
        fill_pool_once()
    request = SamplingRequest.objects.get()
    assert request.status == "failed" and "--served-model-name" in request.error
    assert not Message.objects.filter(origin="model").exists() and StandIn.requests == []


def lora_policy(source_dir, destination):
    """A policy trained with LoRA as PPO trains it: its folder holds the merged weights and the adapter alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ml.modeling import ADAPTER_DIR, apply_lora, save_model

    model = apply_lora(AutoModelForCausalLM.from_pretrained(source_dir), rank=4, alpha=8, top_layers=1)
    save_model(model, AutoTokenizer.from_pretrained(source_dir), destination)
    assert (destination / ADAPTER_DIR / "adapter_config.json").is_file() and (destination / "config.json").is_file()
    return destination


@pytest.mark.django_db
def test_a_promoted_lora_policy_is_loaded_into_the_running_server(stand_in, tiny_policy, settings, tmp_path):
    """The server runs the parent (tiny_policy); the promoted PPO version is an adapter over it: the worker asks the
    server to load it and samples it under its own name, with no restart; candidates are recorded under it."""
    from models_service.services import model_version_activate, model_version_register

    server, url = stand_in
    StandIn.served = [tiny_policy.name]
    settings.SAMPLING_BACKEND, settings.SAMPLING_VLLM_URL, settings.SAMPLING_K = "vllm", url, 2
    settings.SAMPLING_POOL_TARGET, settings.SAMPLING_BATCH_CONTEXTS = 5, 1
    folder = lora_policy(tiny_policy.artifact_dir, settings.ARTIFACTS_DIR / "models" / "policy-ppo-v1-test")
    ppo = model_version_register(
        kind="policy", stage="ppo", artifact_dir=folder, name="policy-ppo-v1", parent=tiny_policy, source="test"
    )
    model_version_activate(version=ppo, reason="promoted by the gate")
    MessageFactory(conversation=ConversationFactory(split="train"), text="prompt 0")

    done = fill_pool_once()
    assert done["model_version"] == "policy-ppo-v1"
    assert StandIn.loads == [{"lora_name": "policy-ppo-v1", "lora_path": str(folder / "adapter")}]
    assert [r["model"] for r in StandIn.requests] == ["policy-ppo-v1"]
    assert set(Message.objects.filter(origin="model").values_list("model_version", flat=True)) == {ppo.pk}

    MessageFactory(conversation=ConversationFactory(split="train"), text="prompt 1")
    fill_pool_once()
    assert len(StandIn.loads) == 1, "loaded once: the next batch finds it served"


@pytest.mark.django_db
def test_the_adapter_path_is_where_the_server_sees_the_workers_disk(stand_in, tiny_policy, settings, tmp_path):
    from models_service.openai_backend import BackendError, OpenAICompatibleBackend
    from models_service.sampling import serve_on
    from models_service.services import model_version_register

    server, url = stand_in
    StandIn.served = [tiny_policy.name]
    settings.SAMPLING_VLLM_ARTIFACTS_DIR = "/mnt/sampling-disk"
    folder = lora_policy(tiny_policy.artifact_dir, settings.ARTIFACTS_DIR / "models" / "policy-ppo-v2-test")
    ppo = model_version_register(
        kind="policy", stage="ppo", artifact_dir=folder, name="policy-ppo-v2", parent=tiny_policy, source="test"
    )
    with pytest.raises(BackendError, match="did not load|No adapter found"):
        serve_on(OpenAICompatibleBackend(url), ppo)
    assert StandIn.loads == [
        {"lora_name": "policy-ppo-v2", "lora_path": "/mnt/sampling-disk/models/policy-ppo-v2-test/adapter"}
    ]


@pytest.mark.django_db
def test_a_full_weight_policy_is_refused_with_what_to_do(stand_in, tiny_policy, tiny_model_dirs, settings):
    """An SFT version (full weights) over the served parent cannot be loaded at run time: refused, nothing
    recorded, the reason says to restart the server on it."""
    from models_service.services import model_version_activate
    from tests.support.models import register_tiny_policy

    server, url = stand_in
    StandIn.served = [tiny_policy.name]
    settings.SAMPLING_BACKEND, settings.SAMPLING_VLLM_URL, settings.SAMPLING_K = "vllm", url, 2
    sft = register_tiny_policy(tiny_model_dirs[1], name="policy-sft-v1", stage="sft")
    sft.parent = tiny_policy
    sft.save(update_fields=["parent"])
    model_version_activate(version=sft, reason="promoted")
    MessageFactory(conversation=ConversationFactory(split="train"), text="prompt")
    with pytest.raises(Exception, match="is full weights, not a LoRA adapter"):
        fill_pool_once()
    assert "restart the sampling server on it" in SamplingRequest.objects.get().error
    assert StandIn.loads == [] and StandIn.requests == [] and not Message.objects.filter(origin="model").exists()
