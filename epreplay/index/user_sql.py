"""User SQL (`epreplay sql RUN "..."`) on a run's index: one read-only query that touches no file.

A run directory may come from someone else, and a query string may come from a script or a
copied snippet: `epreplay sql` must not turn into a way to write files (COPY ... TO, EXPORT
DATABASE), read them (read_csv, read_text, read_blob, glob, ATTACH) or reach the network
(INSTALL, LOAD). Three locks, each enough alone for what it covers:

1. the statement is parsed first: exactly one, of a type that only reads (SELECT, EXPLAIN,
   PRAGMA, CALL); anything else is refused by name before it runs;
2. the connection is read-only (RunIndex opens it so): no statement changes the index;
3. DuckDB's external access is off and the configuration locked, so a read-only-looking SELECT
   that calls a file-reading table function fails, and no later SET turns access back on.

`--allow-external` lifts 3 and lets COPY / EXPORT / ATTACH / DETACH / INSTALL / LOAD through 1:
the query may then read and write files as the user. It stays one statement on a read-only
connection.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from epreplay.errors import UsageError

if TYPE_CHECKING:
    import duckdb

# StatementType names that only read. SELECT covers WITH, VALUES, FROM-first, SUMMARIZE,
# DESCRIBE and SHOW; PRAGMA and CALL run table functions (table_info, pragma_version) and
# settings (locked). What they could reach beyond the index is stopped by lock 3.
READ_TYPES = ("SELECT", "EXPLAIN", "PRAGMA", "CALL")
# Statement types whose whole point is a file, a database file or an extension (the network).
# INSTALL parses as LOAD.
FILE_TYPES = ("COPY", "COPY_DATABASE", "EXPORT", "ATTACH", "DETACH", "LOAD")

ALLOW_FLAG = "--allow-external"
EXAMPLE = 'epreplay sql RUN "SELECT count(*) FROM calls"'


def check_statement(con: "duckdb.DuckDBPyConnection", text: str, *, allow_external: bool) -> str:
    """The one statement in `text` when `epreplay sql` may run it; else UsageError saying why.

    Args:
        con: any DuckDB connection (used only to parse).
        text: the user's SQL.
        allow_external: the user passed --allow-external (file statements allowed).
    Returns:
        The statement's text.
    Raises:
        UsageError: no statement, several, a parse error, or a statement type not allowed.
    """
    import duckdb

    try:
        statements = con.extract_statements(text)
    except duckdb.Error as exc:
        raise UsageError(f"SQL failed: {_first_line(exc)}") from None
    if not statements:
        raise UsageError(f"no SQL statement in {_quote(text)} (empty, or only ';' and comments); "
                         f"give one query, e.g. {EXAMPLE}")
    if len(statements) > 1:
        kinds = ", ".join(s.type.name for s in statements[:4])
        raise UsageError(f"refused {len(statements)} statements ({kinds}) in one call: epreplay sql "
                         f"runs exactly one; run them one per call")
    kind = statements[0].type.name
    if kind in READ_TYPES or (allow_external and kind in FILE_TYPES):
        return text
    if kind in FILE_TYPES:
        raise UsageError(f"refused {_keyword(text, kind)} statement: it reads or writes files (or "
                         f"fetches extensions) outside the index; to let this query read and write "
                         f"files as you, pass {ALLOW_FLAG}")
    raise UsageError(f"refused {_keyword(text, kind)} statement: epreplay sql is read-only (allowed: "
                     f"{', '.join(READ_TYPES)}); the index is rebuilt by 'epreplay index RUN --force'")


def shut_external_access(con: "duckdb.DuckDBPyConnection") -> None:
    """Turn DuckDB's file and network access off on `con`'s database and lock the configuration
    (the lock is what keeps a user's `SET enable_external_access=true` from undoing it)."""
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def refused_access(exc: Exception) -> UsageError | None:
    """A UsageError for DuckDB refusing file, network or configuration access (lock 3), or None
    when `exc` is an ordinary SQL error."""
    import duckdb

    text = _first_line(exc)
    if isinstance(exc, duckdb.PermissionException) or "configuration has been locked" in text:
        return UsageError(f"refused: {text}; epreplay sql reads only the index: to let this query "
                          f"read and write files as you, pass {ALLOW_FLAG}")
    return None


def _keyword(text: str, kind: str) -> str:
    """The statement's leading keyword as the user wrote it, with DuckDB's type when that
    differs (INSTALL parses as LOAD, `PRAGMA threads=1` as SET)."""
    import re

    m = re.match(r"(?:\s|;|--[^\n]*\n|/\*.*?\*/)*([A-Za-z_]+)", text, re.S)
    word = m.group(1).upper() if m else kind
    return word if word == kind else f"{word} (a {kind})"


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _quote(text: str) -> str:
    # Long or multi-line SQL would break the one-line error: show its start only.
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= 60 else flat[:57] + "...")
