"""epreplay.index: a run's DuckDB index (RUN/index.duckdb) and the typed queries over it.

Owns building and refreshing the index (build: the run-level build; lock: connections and the
one-writer lock; workers: shards indexed in worker processes; shard: one shard's rows, with the C
aggregation _indexc.c; scan, check, store, clock; replays: loading replay reports), the schema
(schema.sql), the named SQL (sql), the typed queries (queries) and the row types they answer with
(rows: shared by stats, diff, the replay report and the TUI), and the user's read-only SQL (user_sql).
May import: epreplay.errors, epreplay.format, duckdb, pyarrow, numpy, zstandard, rich (progress). Never torch,
textual, nor emulate/diff/capture/replay.
"""
