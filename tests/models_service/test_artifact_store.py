"""Issue 18: the artifact store, on a folder and on a real S3-compatible server (moto's server mode, started here).

Upload, atomic publish (the manifest written last), a cache hit that needs no store at all, a corrupted cache
detected and fetched again, and a half-uploaded artifact that is never loaded.
"""

import json
from pathlib import Path

import pytest

from models_service.artifact_store import MANIFEST, ArtifactCorrupt, ArtifactMissing, ArtifactStore
from tests.support.s3 import create_bucket, running_s3_server, storage_options


def _model_folder(root: Path) -> Path:
    folder = root / "model"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    (folder / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    return folder


@pytest.fixture(scope="module")
def s3_server():
    """A real S3-compatible server (moto's server mode) for the module's tests."""
    with running_s3_server() as endpoint:
        yield endpoint


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        yield ArtifactStore(url=f"file://{tmp_path / 'store'}", cache_dir=tmp_path / "cache")
        return
    endpoint = request.getfixturevalue("s3_server")
    bucket = f"artifacts-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    create_bucket(endpoint, bucket)
    yield ArtifactStore(
        url=f"s3://{bucket}/models", cache_dir=tmp_path / "cache", storage_options=storage_options(endpoint)
    )


def test_publish_then_fetch_gives_the_same_files(store, tmp_path):
    folder = _model_folder(tmp_path)
    manifest = store.publish(folder, "policy-sft-v1")
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "tokenizer/vocab.json"}
    assert store.exists("policy-sft-v1") and store.names() == ["policy-sft-v1"]
    local = store.fetch("policy-sft-v1")
    for relative in manifest["files"]:
        assert (local / relative).read_bytes() == (folder / relative).read_bytes()
    with pytest.raises(FileExistsError):
        store.publish(folder, "policy-sft-v1")


def test_a_half_uploaded_artifact_is_never_loaded(store, tmp_path):
    folder = _model_folder(tmp_path)
    # A writer that died after the weights and before the marker: the files are there, the manifest is not.
    store.fs.makedirs(store._remote("policy-ppo-v2"), exist_ok=True)
    store.fs.put_file(str(folder / "model.safetensors"), store._remote("policy-ppo-v2", "model.safetensors"))
    assert not store.exists("policy-ppo-v2") and store.names() == []
    with pytest.raises(ArtifactMissing):
        store.fetch("policy-ppo-v2")
    assert not (store.cache_dir / "policy-ppo-v2").exists()


def test_a_cache_hit_needs_no_store_and_a_corrupted_cache_is_fetched_again(store, tmp_path):
    store.publish(_model_folder(tmp_path), "reward-rm-v1")
    local = store.fetch("reward-rm-v1")
    downloads = []
    real_get = store.fs.get_file
    store.fs.get_file = lambda *a, **k: (downloads.append(a), real_get(*a, **k))[1]
    assert store.fetch("reward-rm-v1") == local and downloads == [], "a verified copy is used as it is"

    weights = local / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0xFF  # same size, one byte flipped
    weights.write_bytes(bytes(data))
    assert store.fetch("reward-rm-v1") == local
    assert [Path(a[1]).name for a in downloads] == ["config.json", "model.safetensors", "vocab.json"]
    assert weights.read_bytes() == (tmp_path / "model" / "model.safetensors").read_bytes()


def test_a_store_copy_that_does_not_match_its_manifest_is_refused(store, tmp_path):
    store.publish(_model_folder(tmp_path), "policy-sft-v3")
    with store.fs.open(store._remote("policy-sft-v3", "config.json"), "w") as stream:
        stream.write('{"hidden_size": 9}')  # changed behind the manifest's back (same size, other bytes)
    with pytest.raises(ArtifactCorrupt, match="config.json: checksum differs"):
        store.fetch("policy-sft-v3")
    assert not (store.cache_dir / "policy-sft-v3").exists()
    assert not list(store.cache_dir.glob(".*partial")), "nothing half-written is left in the cache"


def test_names_are_one_path_segment(tmp_path):
    store = ArtifactStore(url=f"file://{tmp_path}/store", cache_dir=tmp_path / "cache")
    for bad in ("", "../escape", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            store.fetch(bad)
    assert MANIFEST == "_MANIFEST.json"


@pytest.mark.django_db
def test_a_host_with_an_empty_disk_loads_a_version_from_the_store(tiny_model_dirs, settings, tmp_path):
    """Registered on host A (its own ARTIFACTS_DIR), loaded on host B whose disk holds nothing: B fetches the
    version from the store into its own cache, verified, and loads it; a second load uses the cache."""
    from models_service import loading
    from models_service.artifact_store import configured_store
    from tests.support.models import register_tiny_policy

    settings.ARTIFACTS_URL = f"file://{tmp_path / 'store'}"
    settings.ARTIFACTS_DIR = tmp_path / "host-a"
    version = register_tiny_policy(tiny_model_dirs[0], name="policy-sft-v7", stage="sft")
    assert configured_store().names() == ["policy-sft-v7"]

    settings.ARTIFACTS_DIR = tmp_path / "host-b"
    loaded = loading.load_version(version)
    cached = tmp_path / "host-b" / "cache" / "policy-sft-v7"
    assert loaded.version_name == "policy-sft-v7" and (cached / "config.json").is_file()
    assert not (tmp_path / "host-b" / version.artifact_path).exists(), "host B never had the writer's folder"
    before = (cached / "config.json").stat().st_mtime_ns
    loading.load_version(version)
    assert (cached / "config.json").stat().st_mtime_ns == before, "the second load is a cache hit"


@pytest.mark.django_db
def test_a_version_whose_upload_fails_is_not_registered(tiny_model_dirs, settings, tmp_path, monkeypatch):
    from models_service.artifact_store import ArtifactStore
    from models_service.models import ModelVersion
    from tests.support.models import register_tiny_policy

    settings.ARTIFACTS_URL = f"file://{tmp_path / 'store'}"
    settings.ARTIFACTS_DIR = tmp_path / "host-a"

    def broken_upload(self, *args, **kwargs):
        raise OSError("connection reset by the store")

    monkeypatch.setattr(ArtifactStore, "publish", broken_upload)
    with pytest.raises(OSError):
        register_tiny_policy(tiny_model_dirs[0], name="policy-sft-v8", stage="sft")
    assert not ModelVersion.objects.filter(name="policy-sft-v8").exists()


def test_the_cache_keeps_the_most_recently_used_versions(tmp_path):
    """A long-lived host does not fill its disk with every version it ever fetched: beyond `cache_keep`, the least
    recently used versions go, but never the one just fetched nor one used within `cache_min_age_s`."""
    import os
    import time

    store = ArtifactStore(url=f"file://{tmp_path / 'store'}", cache_dir=tmp_path / "cache", cache_keep=2)
    folder = _model_folder(tmp_path)
    names = [f"policy-v{i}" for i in range(4)]
    for name in names:
        store.publish(folder, name)
    hour_ago = time.time() - 3600
    for i, name in enumerate(names[:3]):  # each used an hour ago, v0 the longest ago
        os.utime(store.fetch(name), (hour_ago + 100 * i,) * 2)
    cached = lambda: sorted(p.name for p in (tmp_path / "cache").iterdir())  # noqa: E731
    assert cached() == [names[1], names[2]], "v2's download removed v0, beyond the two most recently used"

    store.fetch(names[1])  # a cache hit: v1 is now the most recently used
    store.fetch(names[3])  # a download: v2 is beyond the two most recently used, and old
    assert cached() == [names[1], names[3]]

    young = ArtifactStore(url=f"file://{tmp_path / 'store'}", cache_dir=tmp_path / "cache-2", cache_keep=1)
    for name in names[:3]:
        young.fetch(name)  # each used just now: none is old enough to remove
    assert len(list((tmp_path / "cache-2").iterdir())) == 3
