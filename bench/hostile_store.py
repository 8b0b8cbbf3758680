"""The artifact store against whoever can write it: hostile manifests and swapped versions, on a `file://` store and
on an S3-compatible server (moto's server mode, started here on 127.0.0.1).

    .venv/bin/python bench/hostile_store.py

Each attack plants a manifest (and the files it names, where the store can hold them) straight into the store, as
anyone with write access to the bucket could, then fetches it into an empty host folder. Counted: the manifests
tried and refused, every file that appeared on the host outside its cache (`store_writes_outside`, must be 0), and
versions whose files and manifest were swapped together after publishing that a host fetched with the registry's
digest anyway (`store_swaps_accepted`, must be 0). The baseline, in the same run: an honest version published and
fetched on each store. The last line is JSON.
"""

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAYLOAD = b'{"planted": true}'


def attacks(host: Path) -> dict[str, dict]:
    """name -> the manifest's "files" (None: a valid entry for PAYLOAD is filled in)."""
    keys = {
        "parent": "../../planted.json",
        "parent_in_folder": "adapter/../../../planted.json",
        "absolute": f"{host}/planted-absolute.json",
        "backslash": "..\\..\\planted.json",
        "code_module": "sitecustomize.py",
        "path_hook": "planted.pth",
        "pickle": "pytorch_model.bin",
        "hidden": ".planted.json",
        "too_deep": "a/b/planted.json",
        "empty_segment": "adapter//planted.json",
        "nul_byte": "planted\x00.json",
    }
    found = {name: {"config.json": None, key: None} for name, key in keys.items()}
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    found |= {
        "negative_size": {"config.json": {"size": -1, "sha256": digest}},
        "size_as_text": {"config.json": {"size": "17", "sha256": digest}},
        "no_digest": {"config.json": {"size": len(PAYLOAD)}},
        "too_many_files": {f"shard-{i}.safetensors": None for i in range(600)},
        "larger_than_the_disk": {"model.safetensors": {"size": 1 << 60, "sha256": digest}},
        "object_longer_than_declared": {"config.json": {"size": 4, "sha256": digest}},
    }
    return found


def plant(store, name: str, files: dict) -> None:
    entries = {}
    store.fs.makedirs(store._remote(name), exist_ok=True)
    for key, entry in files.items():
        entries[key] = entry or {"size": len(PAYLOAD), "sha256": hashlib.sha256(PAYLOAD).hexdigest()}
        # S3 keeps a key with ".." or a leading "/" as it is; a folder store would resolve it out of the store.
        literal = store.url.startswith("s3://") or (not key.startswith("/") and ".." not in key)
        if literal and "\x00" not in key:
            remote = store._remote(name, key)
            store.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
            store.fs.pipe(remote, PAYLOAD)
    store.fs.pipe(store._remote(name, "_MANIFEST.json"), json.dumps({"name": name, "files": entries}).encode())


def honest_folder(root: Path) -> Path:
    folder = root / "honest"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "tokenizer.json").write_text("{}")
    return folder


def run_store(kind: str, store, work: Path) -> dict:
    from models_service.artifact_store import ArtifactRefused, manifest_bytes, manifest_digest

    host = store.cache_dir.parent
    figures = {"manifests_tried": 0, "refused": 0, "accepted": [], "errors": []}
    for name, files in attacks(host).items():
        figures["manifests_tried"] += 1
        plant(store, f"policy-attack-{name.replace('_', '-')}", files)
        try:
            store.fetch(f"policy-attack-{name.replace('_', '-')}")
            figures["accepted"].append(name)
        except ArtifactRefused:
            figures["refused"] += 1
        except Exception as exc:  # refused, but not as the store should say it
            figures["errors"].append(f"{name}: {type(exc).__name__}: {exc}"[:200])
    if kind == "file":  # a link in a folder store, to a file of the store's own host
        figures["manifests_tried"] += 1
        secret = work / "secret.json"
        secret.write_bytes(PAYLOAD)
        plant(store, "policy-attack-link", {"config.json": None})
        remote = Path(store._remote("policy-attack-link", "config.json"))
        remote.unlink()
        remote.symlink_to(secret)
        try:
            store.fetch("policy-attack-link")
            figures["accepted"].append("link")
        except ArtifactRefused:
            figures["refused"] += 1
    figures["writes_outside"] = sorted(
        str(p) for p in host.rglob("*") if p.is_file() and store.cache_dir not in p.parents
    )
    figures["planted_in_cache"] = sorted(
        str(p.relative_to(store.cache_dir)) for p in store.cache_dir.rglob("*planted*")
    )

    # Baseline: an honest version, published and fetched; then its files and manifest swapped together.
    manifest = store.publish(honest_folder(work / kind), "policy-honest-v1")
    digest = manifest_digest(manifest)
    figures["honest_fetch_ok"] = (store.fetch("policy-honest-v1", digest=digest) / "config.json").is_file()
    swapped = {**manifest, "files": dict(manifest["files"])}
    weights = b"\x00" * 1024
    store.fs.pipe(store._remote("policy-honest-v1", "model.safetensors"), weights)
    swapped["files"]["model.safetensors"] = {"size": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}
    store.fs.pipe(store._remote("policy-honest-v1", "_MANIFEST.json"), manifest_bytes(swapped))
    shutil.rmtree(store.cache_dir)  # a host with an empty disk
    figures["swaps_tried"], figures["swaps_accepted"] = 1, 0
    try:
        store.fetch("policy-honest-v1", digest=digest)
        figures["swaps_accepted"] = 1
    except ArtifactRefused:
        pass
    return figures


def main() -> None:
    from models_service.artifact_store import ArtifactStore
    from tests.support.s3 import create_bucket, running_s3_server, storage_options

    result = {}
    with running_s3_server() as endpoint, tempfile.TemporaryDirectory() as work:
        work = Path(work)
        create_bucket(endpoint, "bench")
        stores = {
            "file": ArtifactStore(url=f"file://{work / 'store'}", cache_dir=work / "host-file" / "cache"),
            "s3": ArtifactStore(
                url="s3://bench/models",
                cache_dir=work / "host-s3" / "cache",
                storage_options=storage_options(endpoint),
            ),
        }
        for kind, store in stores.items():
            store.cache_dir.mkdir(parents=True)
            figures = run_store(kind, store, work)
            result[kind] = figures
            print(kind, json.dumps(figures), flush=True)
    total = {
        "store_manifests_tried": sum(f["manifests_tried"] for f in result.values()),
        "store_manifests_refused": sum(f["refused"] for f in result.values()),
        "store_manifests_accepted": sum(len(f["accepted"]) for f in result.values()),
        "store_errors_other_than_refused": sum(len(f["errors"]) for f in result.values()),
        "store_writes_outside": sum(len(f["writes_outside"]) for f in result.values()),
        "store_planted_files_in_cache": sum(len(f["planted_in_cache"]) for f in result.values()),
        "store_swaps_tried": sum(f["swaps_tried"] for f in result.values()),
        "store_swaps_accepted": sum(f["swaps_accepted"] for f in result.values()),
        "honest_fetches_ok": sum(bool(f["honest_fetch_ok"]) for f in result.values()),
        "stores": sorted(result),
    }
    print(json.dumps(total))


if __name__ == "__main__":
    main()
