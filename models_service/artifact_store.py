"""Model artifacts in a store that every host reaches: a folder (`file://`, the default) or any S3-compatible
object store (`s3://bucket/prefix`: AWS, MinIO, Ceph, R2), behind fsspec.

Publishing is atomic for readers: the files go up under the artifact's prefix, then a manifest (every file's
size and SHA-256) is written last as the marker `_MANIFEST.json`. An artifact without its marker does not exist
(a writer that died half-way left files nobody loads). Readers keep a local cache keyed by the artifact's name,
verify it against the manifest (sizes and checksums) before handing it out, and fetch it again when it does not
match (a torn or corrupted copy). Whoever can write the store can write a manifest, so a reader checks it before
writing anything: plain file names of a model folder inside the artifact (manifest_key_problems), sizes the disk
can hold, and no stored file longer than its manifest says.

No torch here: the web process may list artifacts.
"""

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec

MANIFEST = "_MANIFEST.json"
CHUNK = 1 << 20

REQUIRED_FILES = ("config.json",)
REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

# What a manifest may name: the files of a save_pretrained folder (weights, configs, tokenizer), at most one folder
# deep (a LoRA policy's adapter/), each path segment a plain name. No code (.py), nothing pickled, no way out of
# the artifact's folder: a manifest is read from a store that others may write to.
MANIFEST_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".md", ".tiktoken")
MANIFEST_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MANIFEST_MAX_DEPTH = 2
MANIFEST_MAX_FILES = 512
MANIFEST_MAX_BYTES = 1 << 20  # the manifest file itself
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def artifact_problems(path: Path) -> list[str]:
    """What keeps a folder from being a loadable save_pretrained model with safetensors weights."""
    if not path.is_dir():
        return [f"{path} does not exist"]
    problems = [f"{name} is missing" for name in REQUIRED_FILES if not (path / name).is_file()]
    if not any(path.glob("*.safetensors")):
        problems.append("no .safetensors weights")
    refused = sorted(p.name for p in path.iterdir() if p.suffix in REFUSED_SUFFIXES)
    if refused:
        problems.append(f"pickle-based weights are not accepted: {', '.join(refused)}")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        problems.append("no tokenizer")
    return problems


class ArtifactMissing(LookupError):
    """No complete artifact of that name in the store (never published, or its upload never finished)."""


class ArtifactCorrupt(RuntimeError):
    """A copy that does not match its manifest, even after fetching it again."""


class ArtifactRefused(ArtifactCorrupt):
    """A manifest or a stored file that this host will not write: a path out of the artifact's folder, a file a
    model folder does not have, too many or too large files, a link. Nothing of it was written."""


def manifest_key_problems(manifest) -> list[str]:
    """Why `manifest` cannot be fetched as it is (empty when it can): its shape, and every file it names must be a
    plain relative path inside the artifact (no "..", no absolute path, no backslash), at most
    MANIFEST_MAX_DEPTH deep, with a suffix a model folder has, a whole size and a SHA-256."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return ["the manifest has no 'files' object"]
    files = manifest["files"]
    if not files:
        return ["the manifest names no file"]
    if len(files) > MANIFEST_MAX_FILES:
        return [f"the manifest names {len(files)} files (at most {MANIFEST_MAX_FILES})"]
    found = []
    for key, entry in files.items():
        shown = repr(key)[:80]
        segments = key.split("/") if isinstance(key, str) else []
        if not segments or not all(MANIFEST_SEGMENT.fullmatch(segment) for segment in segments):
            found.append(f"{shown}: not a plain relative path inside the artifact")
        elif len(segments) > MANIFEST_MAX_DEPTH:
            found.append(f"{shown}: more than {MANIFEST_MAX_DEPTH - 1} folder deep")
        elif key == MANIFEST or not key.endswith(MANIFEST_SUFFIXES):
            found.append(f"{shown}: not a file a model folder has ({', '.join(MANIFEST_SUFFIXES)})")
        elif not isinstance(entry, dict):
            found.append(f"{shown}: no size and checksum")
        elif type(entry.get("size")) is not int or entry["size"] < 0:
            found.append(f"{shown}: size {entry.get('size')!r} is not a whole number of bytes")
        elif not isinstance(entry.get("sha256"), str) or not SHA256_HEX.fullmatch(entry["sha256"]):
            found.append(f"{shown}: no SHA-256")
    return found


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_of(folder: Path) -> dict:
    """{"files": {relative path: {"size", "sha256"}}} of every file under `folder` (the manifest left out)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative == MANIFEST:
            continue
        files[relative] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    return {"files": files}


def manifest_bytes(manifest: dict) -> bytes:
    """The manifest as it is written to the store: its SHA-256 is what the registry records."""
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


def manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(manifest_bytes(manifest)).hexdigest()


def manifest_problems(folder: Path, manifest: dict) -> list[str]:
    """How `folder` differs from `manifest` (empty when it matches): missing files, sizes, checksums."""
    found = []
    for relative, expected in manifest["files"].items():
        path = folder / relative
        if not path.is_file():
            found.append(f"{relative}: missing")
        elif path.stat().st_size != expected["size"]:
            found.append(f"{relative}: {path.stat().st_size} bytes, expected {expected['size']}")
        elif sha256_of(path) != expected["sha256"]:
            found.append(f"{relative}: checksum differs")
    return found


@dataclass
class ArtifactStore:
    """`url`: where artifacts live (file:///abs/path or s3://bucket/prefix); `cache_dir`: this host's copies.

    `storage_options` go to fsspec (for S3: key, secret, endpoint_url through client_kwargs, ...); without them
    s3fs reads the usual AWS variables and files."""

    url: str
    cache_dir: Path
    storage_options: dict | None = None
    # The cache keeps the `cache_keep` most recently used versions (None: all); a version used within
    # `cache_min_age_s` is never removed (another process of this host may be loading it).
    cache_keep: int | None = None
    cache_min_age_s: float = 600.0

    def __post_init__(self):
        self.fs, self.root = fsspec.core.url_to_fs(self.url.rstrip("/"), **(self.storage_options or {}))
        self.cache_dir = Path(self.cache_dir)

    def _remote(self, name: str, relative: str = "") -> str:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"an artifact name is one path segment, not {name!r}")
        return f"{self.root}/{name}" + (f"/{relative}" if relative else "")

    # --- writers ---

    def publish(self, folder: Path, name: str) -> dict:
        """Upload `folder` as artifact `name`, its manifest last. Returns the manifest. Refuses to overwrite a
        published artifact (versions are immutable; publish under a new name)."""
        folder = Path(folder)
        if self.exists(name):
            raise FileExistsError(f"artifact {name} is already published")
        manifest = manifest_of(folder)
        if not manifest["files"]:
            raise ValueError(f"{folder} holds no files")
        refused = manifest_key_problems(manifest)
        if refused:  # what no host would fetch is not published
            raise ValueError(f"{folder} cannot be published: {'; '.join(refused[:5])}")
        for relative in manifest["files"]:
            target = self._remote(name, relative)
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(folder / relative), target)
        manifest |= {"name": name}
        # The marker, written last: with it the artifact exists; an upload cut short leaves none.
        self.fs.pipe(self._remote(name, MANIFEST), manifest_bytes(manifest))
        return manifest

    # --- readers ---

    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache()  # another host may have published since (s3fs caches listings)
        return self.fs.exists(self._remote(name, MANIFEST))

    def manifest(self, name: str, *, digest: str | None = None) -> dict:
        """The artifact's manifest; with `digest` (the SHA-256 the registry recorded when it was published), only
        that one: a manifest swapped in the store since, with its files, is refused."""
        self.fs.invalidate_cache()
        try:
            with self.fs.open(self._remote(name, MANIFEST), "rb") as stream:
                raw = stream.read(MANIFEST_MAX_BYTES + 1)
        except FileNotFoundError:
            raise ArtifactMissing(f"no complete artifact {name!r} in {self.url}") from None
        if len(raw) > MANIFEST_MAX_BYTES:
            raise ArtifactRefused(f"artifact {name}'s manifest is over {MANIFEST_MAX_BYTES} bytes")
        found = hashlib.sha256(raw).hexdigest()
        if digest is not None and found != digest:
            raise ArtifactRefused(
                f"artifact {name}'s manifest in the store is not the one registered for {name} "
                f"(SHA-256 {found[:12]}…, registered {digest[:12]}…): its files were replaced after it was published"
            )
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ArtifactRefused(f"artifact {name}'s manifest is not JSON: {exc}") from None

    def manifest_digest(self, name: str) -> str:
        """The SHA-256 of the artifact's manifest as the store holds it now."""
        self.fs.invalidate_cache()
        try:
            with self.fs.open(self._remote(name, MANIFEST), "rb") as stream:
                return hashlib.sha256(stream.read(MANIFEST_MAX_BYTES + 1)).hexdigest()
        except FileNotFoundError:
            raise ArtifactMissing(f"no complete artifact {name!r} in {self.url}") from None

    def names(self) -> list[str]:
        """The published artifacts (those with their marker)."""
        self.fs.invalidate_cache()
        found = []
        for path in self.fs.glob(f"{self.root}/*/{MANIFEST}"):
            found.append(path.rstrip("/").split("/")[-2])
        return sorted(found)

    def fetch(self, name: str, *, digest: str | None = None) -> Path:
        """A verified local copy of artifact `name`: the cached one when it matches the manifest, else a fresh
        download (into a temporary folder, verified, then moved into place). With `digest`, only the manifest
        the registry recorded (see manifest()). Raises ArtifactMissing, ArtifactCorrupt or ArtifactRefused."""
        manifest = self.manifest(name, digest=digest)
        refused = manifest_key_problems(manifest)
        if refused:
            raise ArtifactRefused(f"artifact {name}'s manifest is refused: {'; '.join(refused[:5])}")
        local = self.cache_dir / name
        if local.is_dir() and not manifest_problems(local, manifest):
            os.utime(local)  # used now: the eviction keeps the most recently used
            return local
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        total, free = sum(e["size"] for e in manifest["files"].values()), shutil.disk_usage(self.cache_dir).free
        if total > free:
            raise ArtifactRefused(f"artifact {name} is {total} bytes; {self.cache_dir} has {free} free")
        staging = self.cache_dir / f".{name}.{uuid.uuid4().hex[:8]}.partial"
        try:
            for relative, expected in manifest["files"].items():
                self._download(name, relative, staging / relative, expected["size"])
            wrong = manifest_problems(staging, manifest)
            if wrong:
                raise ArtifactCorrupt(f"artifact {name} does not match its manifest: {'; '.join(wrong[:5])}")
            (staging / MANIFEST).write_bytes(manifest_bytes(manifest))
            if local.exists():  # a stale or corrupted copy: replaced as a whole
                shutil.rmtree(local, ignore_errors=True)
            try:
                os.replace(staging, local)
            except OSError:  # another process on this host put its verified copy there first
                if not local.is_dir() or manifest_problems(local, manifest):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        os.utime(local)
        self.evict(keep=name)
        return local

    def _download(self, name: str, relative: str, target: Path, size: int) -> None:
        """Copy one stored file to `target`, a plain file, never more than the `size` bytes its manifest gives
        (a store that serves more is refused before the disk fills); a link in the store is refused."""
        remote = self._remote(name, relative)
        info = self.fs.info(remote)
        if info.get("type") != "file" or info.get("islink") or getattr(self.fs, "islink", lambda _: False)(remote):
            raise ArtifactRefused(f"artifact {name}: {relative} is not a plain file in the store")
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with self.fs.open(remote, "rb") as source, open(target, "xb") as sink:
            for block in iter(lambda: source.read(CHUNK), b""):
                written += len(block)
                if written > size:
                    raise ArtifactRefused(f"artifact {name}: {relative} is larger than its manifest's {size} bytes")
                sink.write(block)

    def evict(self, *, keep: str = "") -> list[str]:
        """Remove the cached versions beyond the `cache_keep` most recently used, never `keep` nor one used within
        `cache_min_age_s`. Returns the names removed."""
        if self.cache_keep is None or not self.cache_dir.is_dir():
            return []
        cached = sorted(
            (p for p in self.cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        now, removed = time.time(), []
        for path in cached[self.cache_keep :]:
            if path.name != keep and now - path.stat().st_mtime >= self.cache_min_age_s:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        return removed


# --- the deployment's store (settings.ARTIFACTS_URL) ---


def configured_store() -> ArtifactStore | None:
    """The store of ARTIFACTS_URL, with this host's cache in ARTIFACTS_DIR/cache; None on a shared disk."""
    from django.conf import settings

    if not settings.ARTIFACTS_URL:
        return None
    return ArtifactStore(
        url=settings.ARTIFACTS_URL,
        cache_dir=Path(settings.ARTIFACTS_DIR) / "cache",
        storage_options=settings.ARTIFACTS_STORAGE_OPTIONS or None,
        cache_keep=settings.ARTIFACTS_CACHE_KEEP or None,
    )


def local_dir(version) -> Path:
    """A folder on this host holding `version`'s files: its own folder under ARTIFACTS_DIR where this host wrote
    it (or the disk is shared), else a verified copy from the store (fetched once, then cached) of the manifest
    whose SHA-256 the version's row records. A version registered before rows recorded it records the manifest
    it finds the first time (and is held to it from then on)."""
    own = version.artifact_dir
    store = configured_store()
    if store is None or not artifact_problems(own):
        return own
    digest = version.manifest_sha256
    if not digest:
        digest = store.manifest_digest(version.name)
        type(version).objects.filter(pk=version.pk, manifest_sha256="").update(manifest_sha256=digest)
        digest = type(version).objects.values_list("manifest_sha256", flat=True).get(pk=version.pk)
        version.manifest_sha256 = digest
    return store.fetch(version.name, digest=digest)
