"""The index's file handling: DuckDB connections and the one-writer lock (RUN/index.duckdb.lock).

A writer holds an flock on RUN/index.duckdb.lock (the kernel drops it if the writer dies) and
writes its pid into it, so a second writer's error names the holder.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from epreplay.errors import UsageError
from epreplay.format.run import RunDir


def connect(path: Path | str, *, read_only: bool = False) -> "duckdb.DuckDBPyConnection":
    """duckdb.connect without DuckDB's own progress bar: it draws on stdout for long statements,
    which would corrupt `--format json` output; our commands show progress on stderr."""
    import duckdb

    con = duckdb.connect(str(path), read_only=read_only)
    con.execute("SET enable_progress_bar = false")
    return con


LOCK_NAME = "index.duckdb.lock"


class IndexLocked(UsageError):
    """Another process is writing this run's index."""


class WriterLock:
    """flock on RUN/index.duckdb.lock, non-blocking (or waiting up to `wait_s`)."""

    def __init__(self, run: RunDir, *, wait_s: float = 0.0) -> None:
        self.path = run.inside(LOCK_NAME)
        self.wait_s = wait_s
        self.fd: int | None = None

    def __enter__(self) -> "WriterLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise UsageError(f"{self.path}: cannot create the index lock ({exc.strerror}); "
                             f"is the run directory writable?") from None
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise IndexLocked(f"{self.path.parent / 'index.duckdb'}: index locked by another "
                                      f"writer (pid {holder}); wait for it to finish, then retry") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None
