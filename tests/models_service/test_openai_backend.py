"""Issue 18: the ranking pool sampled through an OpenAI-compatible server (the API `vllm serve` offers), against a
small stand-in server started here: what it samples is recorded under the active version with the parameters, and
a server that does not serve the active version is refused with the reason."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from labeling.models import Message, Task, TaskKind
from models_service.models import SamplingRequest
from models_service.sampling import fill_pool_once
from tests.support.factories import ConversationFactory, MessageFactory


class StandIn(BaseHTTPRequestHandler):
    served = ["policy"]
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
            self._send(200, {"object": "list", "data": [{"id": name, "object": "model"} for name in self.served]})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandIn.requests.append(body)
        if body["model"] not in self.served:
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
    StandIn.requests = []
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
    with pytest.raises(Exception, match=f"not the active policy {tiny_policy.name}"):
        fill_pool_once()
    request = SamplingRequest.objects.get()
    assert request.status == "failed" and "--served-model-name" in request.error
    assert not Message.objects.filter(origin="model").exists() and StandIn.requests == []
