"""The default model through the artifact store against a plain file copy, measured in the same run.

    .venv/bin/python bench/artifact_store.py

Converts the default model (SmolLM2-135M-Instruct, once, into var/bench-cache), then times: a plain
`shutil.copytree` of its folder (the baseline); publishing it to a `file://` store and to an S3-compatible server
(moto's server mode, started here on 127.0.0.1); fetching it into an empty cache from each (download and verify);
and fetching it again (a cache hit: the manifest read and the local checksums). The last line is JSON.
"""

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def seconds(action) -> float:
    started = time.perf_counter()
    action()
    return round(time.perf_counter() - started, 3)


def moto_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            return server, url
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("moto_server did not start")


def main() -> None:
    from bench.sampling import default_model_dir
    from models_service.artifact_store import ArtifactStore

    model = default_model_dir()
    size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    result = {"model_bytes": size}
    server, endpoint = moto_server()
    try:
        with tempfile.TemporaryDirectory() as work:
            work = Path(work)
            shutil.copytree(model, work / "warm-up")  # the page cache holds the model for every measurement alike
            result["copytree_s"] = seconds(lambda: shutil.copytree(model, work / "copy"))
            import boto3

            boto3.client(
                "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
            ).create_bucket(Bucket="bench")
            stores = {
                "file": ArtifactStore(url=f"file://{work / 'store'}", cache_dir=work / "cache-file"),
                "s3": ArtifactStore(
                    url="s3://bench/models",
                    cache_dir=work / "cache-s3",
                    storage_options={
                        "key": "t",
                        "secret": "t",
                        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
                    },
                ),
            }
            for kind, store in stores.items():
                result[f"{kind}_publish_s"] = seconds(lambda store=store: store.publish(model, "policy-base-v0"))
                result[f"{kind}_fetch_s"] = seconds(lambda store=store: store.fetch("policy-base-v0"))
                result[f"{kind}_cache_hit_s"] = seconds(lambda store=store: store.fetch("policy-base-v0"))
                result[f"{kind}_fetch_vs_copy"] = round(result[f"{kind}_fetch_s"] / max(result["copytree_s"], 1e-3), 2)
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
