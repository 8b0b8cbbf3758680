"""The default model through the artifact store against a plain file copy, measured in the same run.

    .venv/bin/python bench/artifact_store.py

Converts the default model (SmolLM2-135M-Instruct, once, into var/bench-cache), then times: a plain
`shutil.copytree` of its folder (the baseline); publishing it to a `file://` store and to an S3-compatible server
(moto's server mode, started here on 127.0.0.1); fetching it into an empty cache from each (download and verify);
and fetching it again (a cache hit: the manifest read and the local checksums). The last line is JSON.
"""

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def seconds(action) -> float:
    started = time.perf_counter()
    action()
    return round(time.perf_counter() - started, 3)


def main() -> None:
    from bench.sampling import default_model_dir
    from models_service.artifact_store import ArtifactStore
    from tests.support.s3 import create_bucket, running_s3_server, storage_options

    model = default_model_dir()
    size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    result = {"model_bytes": size}
    with running_s3_server() as endpoint, tempfile.TemporaryDirectory() as work:
        work = Path(work)
        shutil.copytree(model, work / "warm-up")  # the page cache holds the model for every measurement alike
        result["copytree_s"] = seconds(lambda: shutil.copytree(model, work / "copy"))
        create_bucket(endpoint, "bench")
        stores = {
            "file": ArtifactStore(url=f"file://{work / 'store'}", cache_dir=work / "cache-file"),
            "s3": ArtifactStore(
                url="s3://bench/models", cache_dir=work / "cache-s3", storage_options=storage_options(endpoint)
            ),
        }
        for kind, store in stores.items():
            result[f"{kind}_publish_s"] = seconds(lambda store=store: store.publish(model, "policy-base-v0"))
            result[f"{kind}_fetch_s"] = seconds(lambda store=store: store.fetch("policy-base-v0"))
            result[f"{kind}_cache_hit_s"] = seconds(lambda store=store: store.fetch("policy-base-v0"))
            result[f"{kind}_fetch_vs_copy"] = round(result[f"{kind}_fetch_s"] / max(result["copytree_s"], 1e-3), 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
