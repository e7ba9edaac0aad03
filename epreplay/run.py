"""A run directory on disk: manifest, shards, index and replay reports.

    RUN/manifest.json
    RUN/shards/rank-00000.eprs ...
    RUN/index.duckdb
    RUN/replays/<id>.json

Paths inside a run are relative and fixed by this module; nothing read from disk may steer a path
outside the run (absolute paths and `..` are rejected).
"""
from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from epreplay.errors import UsageError
from epreplay.records import Manifest

MANIFEST = "manifest.json"
SHARDS = "shards"
INDEX = "index.duckdb"
REPLAYS = "replays"
SHARD_RE = re.compile(r"^rank-(\d{5,})\.eprs$")

# Directories and files of a run are owner-only: payload capture may hold user data.
DIR_MODE = 0o700


def shard_name(rank: int) -> str:
    return f"rank-{rank:05d}.eprs"


def new_run_id() -> str:
    """Sortable, unique: UTC time then 8 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def safe_relative(base: Path, rel: str) -> Path:
    """Resolve `rel` inside `base`, refusing absolute paths and `..` (from a manifest, a report)."""
    candidate = Path(rel)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise UsageError(f"{rel!r} in {base}: paths inside a run must be relative and stay inside it")
    return base / candidate


@dataclass(frozen=True)
class RunDir:
    """A run directory. Construct with `RunDir.open` (existing) or `RunDir.create` (new)."""

    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def shards_dir(self) -> Path:
        return self.path / SHARDS

    @property
    def index_path(self) -> Path:
        return self.path / INDEX

    @property
    def replays_dir(self) -> Path:
        return self.path / REPLAYS

    def shard_path(self, rank: int) -> Path:
        return self.shards_dir / shard_name(rank)

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, exist_ok: bool = False) -> "RunDir":
        """Make a new, owner-only run directory. Refuses a directory that already holds a run
        (nothing a user recorded is ever overwritten) unless `exist_ok` (ranks joining a run
        that rank 0 or the launcher created)."""
        run = cls(Path(path))
        if run.path.exists() and not run.path.is_dir():
            raise UsageError(f"{run.path}: exists and is not a directory; choose another --out")
        if run.path.is_dir() and not exist_ok and (run.manifest_path.exists() or run.shards_dir.exists()):
            raise UsageError(f"{run.path}: already holds a run; choose another --out (nothing is overwritten)")
        run.path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        run.shards_dir.mkdir(mode=DIR_MODE, exist_ok=True)
        return run

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "RunDir":
        """Open an existing run, with one clear error when `path` is not one."""
        run = cls(Path(path))
        if not run.path.exists():
            raise UsageError(f"{run.path}: no such run directory")
        if not run.path.is_dir():
            raise UsageError(f"{run.path}: not a run directory (expected a folder with manifest.json and shards/)")
        if not run.shards_dir.is_dir() and not run.manifest_path.exists():
            raise UsageError(f"{run.path}: not a run directory (no manifest.json and no shards/); "
                             f"record one with 'epreplay record --out {run.path} -- CMD' or 'epreplay demo'")
        return run

    def shard_paths(self) -> list[Path]:
        """Shards sorted by rank; files that do not look like shards are ignored."""
        if not self.shards_dir.is_dir():
            return []
        found = [p for p in self.shards_dir.iterdir() if SHARD_RE.match(p.name) and p.is_file()]
        return sorted(found, key=lambda p: int(SHARD_RE.match(p.name).group(1)))

    def rank_of(self, shard: Path) -> int:
        m = SHARD_RE.match(shard.name)
        if not m:
            raise UsageError(f"{shard}: not a shard name (expected rank-NNNNN.eprs)")
        return int(m.group(1))

    def read_manifest(self) -> Manifest | None:
        """The manifest, or None when the run has none yet (capture still starting)."""
        if not self.manifest_path.exists():
            return None
        try:
            return Manifest.from_json(self.manifest_path.read_text())
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{self.manifest_path}: unreadable manifest ({exc}); "
                             f"rebuild it with 'epreplay repair {self.path}'") from None

    def write_manifest(self, manifest: Manifest) -> None:
        """Atomically replace manifest.json (write a temp file, fsync, rename)."""
        tmp = self.manifest_path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(manifest.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.manifest_path)
