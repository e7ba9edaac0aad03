"""epreplay.index: a run's DuckDB index (RUN/index.duckdb) and the typed queries over it.

Owns building and refreshing the index (build: the run-level build, its lock and workers; shard:
one shard's rows, with the C aggregation _indexc.c; scan, check, store, clock), the schema
(schema.sql), the named queries and their row types (queries, rows) and the user's read-only SQL
(user_sql).
May import: epreplay.errors, epreplay.format, duckdb, pyarrow, numpy. Never torch, textual, nor
emulate/diff/capture/replay.
"""
