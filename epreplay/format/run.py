"""A run directory on disk: manifest, shards, index and replay reports.

    RUN/manifest.json
    RUN/shards/rank-00000.eprs ...
    RUN/index.duckdb
    RUN/replays/<id>.json

Paths inside a run are relative and fixed by this module; nothing read from disk may steer a path
outside the run (absolute paths and `..` are rejected). Nor may a symlink: every path this module
hands out is checked (`RunDir.inside`) to resolve inside the run, so a `shards/rank-00001.eprs ->
/etc/passwd` or `replays -> /elsewhere` is refused with its name instead of read or written through.
"""
from __future__ import annotations

import os
import re
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from epreplay.errors import UsageError
from epreplay.format.records import Manifest

MANIFEST = "manifest.json"
SHARDS = "shards"
INDEX = "index.duckdb"
REPLAYS = "replays"
CAPTURE = ".capture"
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


def _kind(mode: int) -> str:
    """What a non-regular file is, in words, for error messages."""
    for test, word in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return word
    return "not a regular file"


@dataclass(frozen=True)
class RunDir:
    """A run directory. Construct with `RunDir.open` (existing) or `RunDir.create` (new)."""

    path: Path

    def inside(self, rel: str) -> Path:
        """RUN/rel, refused (UsageError) when a symlink on the way takes it outside the run:
        what a run holds is read and written only inside its directory (the run directory itself
        may be reached through a symlink). The path need not exist yet."""
        path = self.path / rel
        root = self.path.resolve()
        real = path.resolve()
        if real != root and root not in real.parents:
            raise UsageError(f"{path}: leads (through a symlink) to {real}, outside the run; a run's files must stay "
                             f"in {self.path}: replace the link with the file itself or remove it")
        return path

    @property
    def manifest_path(self) -> Path:
        return self.inside(MANIFEST)

    @property
    def shards_dir(self) -> Path:
        return self.inside(SHARDS)

    @property
    def index_path(self) -> Path:
        return self.inside(INDEX)

    @property
    def replays_dir(self) -> Path:
        return self.inside(REPLAYS)

    @property
    def capture_dir(self) -> Path:
        return self.inside(CAPTURE)

    def shard_path(self, rank: int) -> Path:
        return self.inside(f"{SHARDS}/{shard_name(rank)}")

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
        """Shards sorted by rank; files whose names do not look like shards are ignored.

        Raises:
            UsageError: the first problem of `shard_listing` (a shard name that is no regular
                file, or a symlink leaving the run).
        """
        found, problems = self.shard_listing()
        if problems:
            raise UsageError(problems[0])
        return found

    def shard_listing(self) -> tuple[list[Path], list[str]]:
        """(regular shard files sorted by rank, one message per shard name that is not one).

        Not one: a directory, FIFO, socket or device (skipping it silently would hide a rank;
        opening a FIFO would block), a dangling symlink, or a symlink leaving the run."""
        if not self.shards_dir.is_dir():
            return [], []
        found, problems = [], []
        for p in sorted(self.shards_dir.iterdir()):
            if not SHARD_RE.match(p.name):
                continue
            try:
                p = self.inside(f"{SHARDS}/{p.name}")
                mode = p.stat().st_mode
            except UsageError as exc:
                problems.append(str(exc))
                continue
            except OSError as exc:  # a dangling symlink inside the run
                problems.append(f"{p}: cannot be read ({exc.strerror}); restore the shard or move "
                                f"it out of {self.shards_dir}")
                continue
            if not stat.S_ISREG(mode):
                problems.append(f"{p}: {_kind(mode)}, not a shard file; move it out of "
                                f"{self.shards_dir} (or put rank {self.rank_of(p)}'s shard there)")
                continue
            found.append(p)
        return sorted(found, key=lambda p: int(SHARD_RE.match(p.name).group(1))), problems

    def missing_ranks(self, world_size: int | None) -> list[int]:
        """Ranks below `world_size` (the manifest's) with no regular shard file."""
        have = {self.rank_of(p) for p in self.shard_listing()[0]}
        return [r for r in range(world_size or 0) if r not in have]

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
