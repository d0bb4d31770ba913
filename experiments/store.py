"""The one artifact store shared by all jobs (docs/architecture.md).

An artifact is a directory `<root>/<kind>/<key>/` whose key is the sha256 of the resolved upstream config
that determines it. It is produced in a private temp directory, sealed with a COMPLETE.json marker holding
the checksum of every file, and renamed into place under a file lock. A job that dies half-way leaves only
a temp directory, which nobody trusts and the next producer of that key deletes; concurrent jobs that need
the same artifact wait on the lock and then load what the first one made.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MARKER = "COMPLETE.json"


def config_key(material: Any) -> str:
    """sha256 of a JSON-able description of everything that determines an artifact."""
    blob = json.dumps({"schema": SCHEMA_VERSION, "material": material}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def checkpoint_path(self, kind: str, key: str) -> Path:
        """Where the producer of (kind, key) keeps its resumable training state until the artifact is complete."""
        return self.root / "checkpoints" / f"{kind}-{key}.pt"

    def load(self, kind: str, key: str) -> tuple[Path, dict] | None:
        """The artifact's directory and marker if it is complete and every checksum matches, else None."""
        final = self.path(kind, key)
        marker_path = final / MARKER
        if not marker_path.is_file():
            return None
        try:
            marker = json.loads(marker_path.read_text())
            for name, digest in marker["files"].items():
                if file_sha256(final / name) != digest:
                    log.warning("store: %s/%s has a corrupt file %s; it will be rebuilt", kind, key, name)
                    return None
        except (OSError, ValueError, KeyError):
            return None
        return final, marker

    def get_or_create(self, kind: str, key: str, produce: Callable[[Path], dict | None],
                      description: Any = None) -> tuple[Path, dict, bool]:
        """Return (directory, marker, created_now). `produce(tmp_dir)` writes the files and may return a
        JSON-able dict kept in the marker under "meta"."""
        found = self.load(kind, key)
        if found is not None:
            return (*found, False)
        lock_dir = self.root / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_dir / f"{kind}-{key}.lock")):
            found = self.load(kind, key)  # another job may have made it while we waited
            if found is not None:
                return (*found, False)
            tmp_root = self.root / "tmp"
            tmp_root.mkdir(parents=True, exist_ok=True)
            for stale in tmp_root.glob(f"{kind}-{key}-*"):  # left by a killed producer of this key
                shutil.rmtree(stale, ignore_errors=True)
            tmp = tmp_root / f"{kind}-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                meta = produce(tmp)
                files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
                marker = {"kind": kind, "key": key, "schema": SCHEMA_VERSION, "created": time.time(),
                          "description": description, "files": files, "meta": meta or {}}
                (tmp / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True, default=str))
                final = self.path(kind, key)
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.exists():  # an incomplete or corrupt earlier attempt: never trusted, replace it
                    shutil.rmtree(final)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return final, marker, True
