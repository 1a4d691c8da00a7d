"""The registry: publish, list, resolve and remove model versions.

A version is a folder ``{storage}/models/{name}/{version}/`` holding the weights
(safetensors), whatever config rebuilds the model, and ``card.json``. On local
disk a version is written under a hidden temp folder and renamed into place, so
readers never see half of one; two publishers racing for the same number both
succeed with distinct numbers because ``rename`` onto a non-empty folder fails.
On object stores (no atomic rename) ``card.json`` is written last and a version
without it is invisible; on ``s3://`` a publisher first claims its number with a
conditional put (``If-None-Match: *``, which AWS S3 and MinIO honour), so two
publishers racing for one name never write into one folder. Other object stores
(``gs://``) have no such claim here: publish one name from one place at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from maas_ray import storage
from maas_ray.registry.refs import (InvalidModelName, ModelRef, checkpoint_of, is_version,
                                   validate_name)

logger = logging.getLogger(__name__)

CARD = "card.json"
_CACHE = Path(os.environ.get("MAAS_CACHE", "~/.cache/maas")).expanduser()


class ModelNotFound(LookupError):
    """No such model, or no such version of it."""


class TamperedModel(RuntimeError):
    """A version's files do not match the checksums in its card."""


@dataclass(frozen=True)
class ModelVersion:
    """One published version: where it lives and its card."""

    name: str
    version: int
    uri: str
    card: dict[str, Any] = field(hash=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def task(self) -> str:
        return str(self.card.get("task", "unknown"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Registry:
    """Versioned models under one storage root (local path or ``s3://``/``gs://``)."""

    def __init__(self, root: str | None = None) -> None:
        self.root = storage.storage_root(root)
        self.models_uri = storage.join(self.root, "models")
        self._fs, self._base = storage.filesystem(self.models_uri)
        self._local = storage.is_local(self.root)

    # -- reading -----------------------------------------------------------
    def names(self) -> list[str]:
        """Names that have at least one complete version."""
        out = []
        for info in self._ls(self._base):
            if info.type == pafs.FileType.Directory and not info.base_name.startswith("."):
                if self.versions(info.base_name):
                    out.append(info.base_name)
        return sorted(out)

    def versions(self, name: str) -> list[int]:
        """Complete versions of ``name``, ascending (of a checkpoint's name: its model's
        versions that kept that step)."""
        validate_name(name)
        if (ckpt := checkpoint_of(name)) is not None:
            from maas_ray.registry.checkpoints import kept_steps

            return [v for v in self.versions(ckpt[0])
                    if ckpt[1] in kept_steps(self.get(ModelRef(ckpt[0], v)).card)]
        found = []
        for info in self._ls(f"{self._base}/{name}"):
            if info.type == pafs.FileType.Directory and is_version(info.base_name):
                if self._exists(f"{info.path}/{CARD}"):
                    found.append(int(info.base_name))
        return sorted(found)

    def get(self, ref: ModelRef | str) -> ModelVersion:
        """Resolve ``name`` (latest) or ``name:version``; raise :class:`ModelNotFound`.
        A checkpoint's name resolves through its model's card
        (:mod:`maas_ray.registry.checkpoints`)."""
        ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
        if (ckpt := checkpoint_of(ref.name)) is not None:
            from maas_ray.registry.checkpoints import checkpoint_version

            return checkpoint_version(self.get(ModelRef(ckpt[0], ref.version)), ckpt[1])
        versions = self.versions(ref.name)
        if not versions:
            raise ModelNotFound(f"model {ref.name!r} does not exist")
        version = versions[-1] if ref.version is None else ref.version
        if version not in versions:
            raise ModelNotFound(
                f"model {ref.name!r} has no version {version} (versions: {versions})"
            )
        path = f"{self._base}/{ref.name}/{version}"
        with self._fs.open_input_stream(f"{path}/{CARD}") as fh:
            card = json.loads(fh.read())
        return ModelVersion(ref.name, version, storage.join(self.models_uri, ref.name, str(version)), card)

    def change_stamp(self, name: str) -> int | None:
        """Something that changes whenever a version of ``name`` is added or removed.

        Local disk: the folder's mtime in ns (publish and remove both rename inside
        it). Object stores have no such cheap signal: None means "always re-read".
        """
        if not self._local:
            return None
        ckpt = checkpoint_of(name)  # a checkpoint changes with its model's card
        try:
            return os.stat(Path(self._base) / validate_name(ckpt[0] if ckpt else name)).st_mtime_ns
        except FileNotFoundError:
            return None

    def all_versions(self) -> list[ModelVersion]:
        """Every complete version of every model."""
        return [self.get(ModelRef(n, v)) for n in self.names() for v in self.versions(n)]

    def local_dir(self, mv: ModelVersion, verify: bool = True) -> Path:
        """A local folder holding ``mv``'s files (downloaded once for remote storage).

        With ``verify`` the files' sha256 must match the card, so a tampered or
        truncated weights file is refused instead of silently served.
        """
        if self._local:
            path = storage.local_path(mv.uri)
        else:
            path = _CACHE / "models" / mv.name.replace(":", "__") / f"{mv.version}-{self._cache_key(mv)}"
            if not (path / CARD).exists():
                tmp = path.with_name(f".{path.name}-{uuid.uuid4().hex[:8]}")
                tmp.mkdir(parents=True)
                fs, src = storage.filesystem(mv.uri)
                pafs.copy_files(src, str(tmp), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
                try:
                    tmp.rename(path)
                except OSError:  # another process fetched it first
                    shutil.rmtree(tmp, ignore_errors=True)
        if verify:
            for fname, digest in mv.card.get("files", {}).items():
                fpath = path / fname
                if not fpath.exists() or sha256_file(fpath) != digest:
                    raise TamperedModel(
                        f"{mv.id}: file {fname!r} is missing or does not match its checksum"
                    )
        return path

    def _cache_key(self, mv: ModelVersion) -> str:
        """Tells apart equal ``name:version`` ids from two storage roots, or a number
        reused after ``remove`` on an object store, so a cached copy is never stale."""
        ident = [self.root, mv.card.get("created_at"), mv.card.get("files", {})]
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # -- writing -----------------------------------------------------------
    def publish(self, name: str, src: Path, card: dict[str, Any]) -> ModelVersion:
        """Publish the files in local folder ``src`` as the next version of ``name``."""
        validate_name(name)
        src = Path(src)
        card = dict(card, name=name, created_at=card.get("created_at", time.time()))
        card["files"] = {
            str(p.relative_to(src)): sha256_file(p)
            for p in sorted(src.rglob("*"))
            if p.is_file() and p.name != CARD
        }
        if self._local:
            version = self._publish_local(name, src, card)
        else:
            version = self._publish_remote(name, src, card)
        logger.info("published %s:%s", name, version)
        return self.get(ModelRef(name, version))

    def _publish_local(self, name: str, src: Path, card: dict[str, Any]) -> int:
        parent = Path(self._base) / name
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".tmp-{uuid.uuid4().hex}"
        try:
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(CARD))
            _write_json(tmp / CARD, card)
            while True:
                version = self._next_version(parent)
                try:
                    os.rename(tmp, parent / str(version))
                    return version
                except OSError:  # lost the race for this number: take the next one
                    continue
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish_remote(self, name: str, src: Path, card: dict[str, Any]) -> int:
        parent = f"{self._base}/{name}"
        version = max(self._all_numbers(parent), default=0) + 1
        while not self._claim(f"{parent}/{version}"):  # another publisher holds this number
            version += 1
        dest = f"{parent}/{version}"
        self._fs.create_dir(dest)
        for path in sorted(src.rglob("*")):
            if path.is_file() and path.name != CARD:
                pafs.copy_files(str(path), f"{dest}/{path.relative_to(src)}",
                                source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=self._fs)
        with self._fs.open_output_stream(f"{dest}/{CARD}") as fh:  # the commit point
            fh.write(json.dumps(card, indent=2, default=str).encode())
        return version

    def remove(self, ref: ModelRef | str) -> list[ModelVersion]:
        """Remove one version (``name:version``) or every version (``name``)."""
        ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
        if checkpoint_of(ref.name) is not None:
            raise InvalidModelName(f"{ref} is a checkpoint of a fine-tuned model: it is removed "
                                   "with that model")
        targets = [self.get(ref)] if ref.version is not None else [
            self.get(ModelRef(ref.name, v)) for v in self.versions(ref.name)
        ]
        if not targets:
            raise ModelNotFound(f"model {ref.name!r} does not exist")
        for mv in targets:
            path = f"{self._base}/{mv.name}/{mv.version}"
            if self._local:
                # Hide it in one atomic step first, then delete at leisure.
                trash = Path(self._base) / mv.name / f".trash-{uuid.uuid4().hex}"
                os.rename(path, trash)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                self._fs.delete_file(f"{path}/{CARD}")
                self._fs.delete_dir(path)
        return targets

    # -- helpers -----------------------------------------------------------
    def _claim(self, folder: str) -> bool:
        """Take version folder ``folder`` (``bucket/key``) for this publisher: False when
        another one has it. Only ``s3://`` has a conditional put to do it with."""
        if not self.root.startswith("s3://"):
            return True
        from botocore.exceptions import ClientError

        bucket, _, key = folder.partition("/")
        try:
            _s3_client().put_object(Bucket=bucket, Key=f"{key}/{CLAIM}", IfNoneMatch="*",
                                    Body=json.dumps({"by": uuid.uuid4().hex, "at": time.time()}).encode())
            return True
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            # 412: the claim exists; 409: a concurrent put of it is in flight (S3 says retry,
            # but the other publisher will win or release nothing either way: move on).
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or \
                    err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return False
            raise

    def _next_version(self, parent: Path) -> int:
        return max(self._all_numbers(str(parent)), default=0) + 1

    def _all_numbers(self, parent: str) -> list[int]:
        # Every numbered folder counts, complete or not, so numbers never repeat.
        return [int(i.base_name) for i in self._ls(parent) if is_version(i.base_name)]

    def _ls(self, path: str) -> list[pafs.FileInfo]:
        try:
            return self._fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _exists(self, path: str) -> bool:
        return self._fs.get_file_info(path).type != pafs.FileType.NotFound


CLAIM = ".claim"  # marks a number as taken on s3 before its files are written


def _s3_client() -> Any:
    """A boto3 S3 client configured like :func:`maas_ray.storage.filesystem` (endpoint,
    region and credentials from the usual environment variables)."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    return boto3.client("s3", endpoint_url=endpoint or None, region_name=region)


def _write_json(path: Path, obj: Any) -> None:
    with path.open("w") as fh:
        json.dump(obj, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
