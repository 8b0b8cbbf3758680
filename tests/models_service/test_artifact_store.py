"""Issue 18: the artifact store, on a folder and on a real S3-compatible server (moto's server mode, started here).

Upload, atomic publish (the manifest written last), a cache hit that needs no store at all, a corrupted cache
detected and fetched again, and a half-uploaded artifact that is never loaded.
"""

import contextlib
import json
from pathlib import Path

import pytest

from models_service import artifact_store
from models_service.artifact_store import MANIFEST, ArtifactCorrupt, ArtifactMissing, ArtifactRefused, ArtifactStore
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
        yield ArtifactStore(url=f"file://{tmp_path / 'store'}", cache_dir=tmp_path / "host" / "cache")
        return
    endpoint = request.getfixturevalue("s3_server")
    bucket = f"artifacts-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    create_bucket(endpoint, bucket)
    yield ArtifactStore(
        url=f"s3://{bucket}/models", cache_dir=tmp_path / "host" / "cache", storage_options=storage_options(endpoint)
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
    real_download = store._download
    store._download = lambda name, relative, *a: (downloads.append(relative), real_download(name, relative, *a))[1]
    assert store.fetch("reward-rm-v1") == local and downloads == [], "a verified copy is used as it is"

    weights = local / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0xFF  # same size, one byte flipped
    weights.write_bytes(bytes(data))
    assert store.fetch("reward-rm-v1") == local
    assert downloads == ["config.json", "model.safetensors", "tokenizer/vocab.json"]
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


def _swap(store, name: str, relative: str, data: bytes) -> None:
    """Whoever can write the store replaces one of a version's files and rewrites its manifest to match."""
    from models_service.artifact_store import manifest_bytes

    manifest = store.manifest(name)
    store.fs.pipe(store._remote(name, relative), data)
    import hashlib

    manifest["files"][relative] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    store.fs.pipe(store._remote(name, MANIFEST), manifest_bytes(manifest))


@pytest.mark.django_db
def test_weights_and_manifest_swapped_together_are_refused_and_the_ops_page_says_so(
    tiny_model_dirs, settings, tmp_path, client
):
    """The registry row keeps the manifest's digest from when the version was published: a host with an empty
    disk refuses a store whose files and manifest were replaced together, and the serving holder records why."""
    from models_service import loading
    from models_service.artifact_store import configured_store
    from models_service.models import ModelVersion
    from tests.support.factories import UserFactory
    from tests.support.models import register_tiny_policy

    settings.ARTIFACTS_URL = f"file://{tmp_path / 'store'}"
    settings.ARTIFACTS_DIR = tmp_path / "host-a"
    version = register_tiny_policy(tiny_model_dirs[0], name="policy-sft-v5", stage="sft", activate=True)
    assert len(version.manifest_sha256) == 64
    assert version.manifest_sha256 == configured_store().manifest_digest("policy-sft-v5")
    config = json.loads(configured_store().fs.cat(configured_store()._remote("policy-sft-v5", "config.json")))
    _swap(configured_store(), "policy-sft-v5", "config.json", json.dumps({**config, "swapped": True}).encode())

    settings.ARTIFACTS_DIR = tmp_path / "host-b"
    with pytest.raises(ArtifactRefused, match="not the one registered for policy-sft-v5"):
        loading.load_version(version)
    assert not (tmp_path / "host-b" / "cache" / "policy-sft-v5").exists()
    with pytest.raises(ArtifactRefused):
        loading.ActiveModelHolder(ModelVersion.Kind.POLICY).get()
    version.refresh_from_db()
    assert "not the one registered for policy-sft-v5" in version.load_error
    client.force_login(UserFactory(is_staff=True, is_superuser=True))
    page = client.get(f"/ops/models/{version.pk}/").content.decode()
    assert "not the one registered for policy-sft-v5" in page


@pytest.mark.django_db
def test_a_version_registered_without_a_digest_is_held_to_the_first_manifest_a_host_fetched(
    tiny_model_dirs, settings, tmp_path
):
    from models_service import loading
    from models_service.artifact_store import configured_store
    from models_service.models import ModelVersion
    from tests.support.models import register_tiny_policy

    settings.ARTIFACTS_URL = f"file://{tmp_path / 'store'}"
    settings.ARTIFACTS_DIR = tmp_path / "host-a"
    version = register_tiny_policy(tiny_model_dirs[0], name="policy-sft-v6", stage="sft")
    published = version.manifest_sha256
    ModelVersion.objects.filter(pk=version.pk).update(manifest_sha256="")  # a row from before digests
    version.refresh_from_db()

    settings.ARTIFACTS_DIR = tmp_path / "host-b"
    loading.load_version(version)
    assert ModelVersion.objects.get(pk=version.pk).manifest_sha256 == published
    _swap(configured_store(), "policy-sft-v6", "generation_config.json", b"{}")
    settings.ARTIFACTS_DIR = tmp_path / "host-c"
    with pytest.raises(ArtifactRefused, match="not the one registered"):
        loading.load_version(ModelVersion.objects.get(pk=version.pk))


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


def _plant(store, name: str, files: dict, payload: bytes = b'{"x": 1}') -> None:
    """A manifest written straight into the store, as whoever can write the bucket could: each named file is put
    there too (where the store can hold it), with its true size and checksum."""
    import hashlib

    entries = {}
    store.fs.makedirs(store._remote(name), exist_ok=True)
    for key in files:
        entries[key] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        if isinstance(key, str) and not key.startswith("/"):
            with contextlib.suppress(OSError, ValueError):
                _put(store, name, key, payload)
    entries |= {k: v for k, v in files.items() if v is not None}
    with store.fs.open(store._remote(name, MANIFEST), "w") as stream:
        json.dump({"name": name, "files": entries}, stream)


def _put(store, name: str, relative: str, data: bytes) -> None:
    remote = store._remote(name, relative)
    store.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe(remote, data)


def _written_outside(tmp_path) -> list[str]:
    """What a fetch wrote on the host (tmp_path/host) outside its cache: the hostile keys all say "escaped"."""
    return sorted(str(p) for p in (tmp_path / "host").rglob("*escaped*"))


HOSTILE_KEYS = {
    "parent": "../../escaped.json",
    "parent inside a folder": "adapter/../../../escaped.json",
    "absolute": "{tmp}/host/abs-escaped.json",
    "backslashes": "..\\..\\escaped.json",
    "code": "escaped.py",
    "pickle": "escaped.pth",
    "hidden": ".escaped.json",
    "too deep": "a/b/escaped.json",
    "empty segment": "adapter//escaped.json",
}


@pytest.mark.parametrize("key", HOSTILE_KEYS.values(), ids=HOSTILE_KEYS.keys())
def test_a_hostile_manifest_is_refused_before_a_byte_is_written(store, tmp_path, key):
    key = key.format(tmp=tmp_path)
    _plant(store, "policy-evil-v1", {"config.json": None, key: None})
    with pytest.raises(ArtifactRefused, match="manifest is refused"):
        store.fetch("policy-evil-v1")
    assert _written_outside(tmp_path) == []
    assert not store.cache_dir.exists() or not any(store.cache_dir.rglob("*")), "nothing was written to the cache"


@pytest.mark.parametrize(
    "entry",
    [{"size": -1}, {"size": "8"}, {"size": 8.0}, {"sha256": "not-a-digest"}, {"size": 8, "sha256": None}],
    ids=["negative size", "size as text", "size as float", "bad digest", "no digest"],
)
def test_a_manifest_entry_without_a_whole_size_and_digest_is_refused(store, tmp_path, entry):
    _plant(store, "policy-evil-v2", {"config.json": None})
    manifest = json.loads(store.fs.cat(store._remote("policy-evil-v2", MANIFEST)))
    manifest["files"]["config.json"] |= entry
    _put(store, "policy-evil-v2", MANIFEST, json.dumps(manifest).encode())
    with pytest.raises(ArtifactRefused):
        store.fetch("policy-evil-v2")
    assert not store.cache_dir.exists() or not any(store.cache_dir.rglob("*"))


def test_too_many_files_or_more_bytes_than_the_disk_has_are_refused(store, tmp_path):
    from models_service.artifact_store import MANIFEST_MAX_FILES

    many = {f"shard-{i}.safetensors": {"size": 1, "sha256": "0" * 64} for i in range(MANIFEST_MAX_FILES + 1)}
    _put(store, "policy-evil-v3", MANIFEST, json.dumps({"files": many}).encode())
    with pytest.raises(ArtifactRefused, match=f"names {MANIFEST_MAX_FILES + 1} files"):
        store.fetch("policy-evil-v3")
    huge = {"model.safetensors": {"size": 1 << 60, "sha256": "0" * 64}}
    _put(store, "policy-evil-v4", MANIFEST, json.dumps({"files": huge}).encode())
    with pytest.raises(ArtifactRefused, match="free"):
        store.fetch("policy-evil-v4")
    _put(store, "policy-evil-v5", MANIFEST, b"[" * (2 << 20))
    with pytest.raises(ArtifactRefused, match="manifest is over"):
        store.fetch("policy-evil-v5")
    assert not any(store.cache_dir.rglob("*"))


def test_a_stored_file_larger_than_its_manifest_says_stops_the_download(store, tmp_path, monkeypatch):
    """The manifest says 8 bytes; the store serves 4 MiB: the copy stops after the eighth byte, not at the end."""
    _plant(store, "policy-evil-v6", {"config.json": None})
    _put(store, "policy-evil-v6", "config.json", b"x" * (4 << 20))
    written = []

    class Counting:
        def __init__(self, stream):
            self.stream, self.bytes = stream, 0

        def write(self, block):
            self.bytes += len(block)
            return self.stream.write(block)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

    def counting_open(path, mode="r", *args, **kwargs):
        stream = open(path, mode, *args, **kwargs)  # noqa: SIM115 (closed by Counting or by the caller)
        if "x" in mode:
            written.append(Counting(stream))
            return written[-1]
        return stream

    monkeypatch.setattr(artifact_store, "open", counting_open, raising=False)
    with pytest.raises(ArtifactRefused, match="larger than its manifest's 8 bytes"):
        store.fetch("policy-evil-v6")
    assert written and all(sink.bytes <= 8 for sink in written)
    assert not any(store.cache_dir.rglob("*")), "the partial copy is removed"


def test_a_link_in_a_folder_store_is_refused(tmp_path):
    store = ArtifactStore(url=f"file://{tmp_path / 'store'}", cache_dir=tmp_path / "cache")
    secret = tmp_path / "secret.json"
    secret.write_text('{"x": 1}')
    _plant(store, "policy-evil-v7", {"config.json": None})
    remote = Path(store._remote("policy-evil-v7", "config.json"))
    remote.unlink()
    remote.symlink_to(secret)
    with pytest.raises(ArtifactRefused, match="not a plain file"):
        store.fetch("policy-evil-v7")


def test_a_folder_no_host_would_fetch_is_not_published(store, tmp_path):
    folder = _model_folder(tmp_path)
    (folder / "sitecustomize.py").write_text("import os\n")
    with pytest.raises(ValueError, match="sitecustomize.py"):
        store.publish(folder, "policy-sft-v9")
    assert not store.exists("policy-sft-v9")


@pytest.mark.django_db
def test_the_web_host_promotes_and_rolls_back_versions_it_never_had(tiny_model_dirs, settings, tmp_path):
    """Issue 28, item 6: in the multi-host layout the web host keeps no models; a version published to the store
    (its row keeps the manifest's digest) is activated and rolled back from there, while one whose folder exists
    nowhere and was never published is still refused."""
    from django.core.exceptions import ValidationError

    from models_service.models import ModelVersion
    from models_service.services import model_version_activate, model_version_rollback
    from tests.support.models import register_tiny_policy

    settings.ARTIFACTS_URL = f"file://{tmp_path / 'store'}"
    settings.ARTIFACTS_DIR = tmp_path / "training-host"
    first = register_tiny_policy(tiny_model_dirs[0], name="policy-sft-v1", stage="sft", activate=True)
    second = register_tiny_policy(tiny_model_dirs[1], name="policy-dpo-v1", stage="dpo")

    settings.ARTIFACTS_DIR = tmp_path / "web-host"  # an empty disk
    model_version_activate(version=second, reason="promoted from the ops page")
    assert ModelVersion.objects.get(is_active=True, kind="policy") == second
    model_version_rollback(kind="policy", reason="rolled back from the ops page")
    assert ModelVersion.objects.get(is_active=True, kind="policy") == first
    unpublished = ModelVersion.objects.create(
        name="policy-sft-v9", kind="policy", stage="sft", status="ready", artifact_path="models/nowhere"
    )
    with pytest.raises(ValidationError, match="cannot serve"):
        model_version_activate(version=unpublished)
