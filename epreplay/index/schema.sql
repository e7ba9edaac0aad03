-- RUN/index.duckdb: the schema epreplay.index.build builds from a run's shards (see epreplay/index/build.py).
-- Narrow integer types; no primary keys (bulk loads through Arrow); rows inserted in (step, layer)
-- order. step -1 / layer -1 mean "unknown" (as in the record header). Token counts of the load and
-- traffic tables are exact integers computed from the recorded routing (topk_idx_TK of dispatch and
-- ll_dispatch; counts-level runs: num_tokens_per_expert_E / num_tokens_per_rank_R / recv_count_L).
-- Rows of the per-(step, layer) tables are unique per key: incremental indexing merges into them.

CREATE TYPE op_t AS ENUM ('layout', 'dispatch', 'cached_dispatch', 'combine', 'll_dispatch', 'll_combine');
CREATE TYPE status_t AS ENUM ('ok', 'error', 'hung');

-- One row: the run (manifest, or the first shard's header when the manifest is missing).
CREATE TABLE runs (
    run_id VARCHAR, created VARCHAR, release VARCHAR,
    world_size SMALLINT, num_experts SMALLINT, topk SMALLINT, hidden INTEGER,
    level VARCHAR, x_dtype VARCHAR,
    shards SMALLINT,            -- shard files indexed
    missing_ranks VARCHAR,      -- ranks < world_size with no shard, e.g. '5,7' ('' none)
    dropped BIGINT,             -- records the recorders dropped (sum over shards)
    indexed_at TIMESTAMP, index_version SMALLINT, epreplay VARCHAR
);

-- One row per shard file: what was indexed and its health.
CREATE TABLE shards (
    rank SMALLINT, path VARCHAR,  -- path relative to the run directory
    bytes UBIGINT,                -- file size when indexed
    records UINTEGER,             -- intact records indexed (calls + events)
    calls UINTEGER, events UINTEGER,
    complete BOOLEAN,             -- a valid footer (the writer closed cleanly)
    writer_active BOOLEAN,        -- a live capture still held the file when indexed
    truncated_at UBIGINT,         -- byte offset of the first short/damaged record; NULL = none
    lost_bytes UBIGINT,           -- bytes from truncated_at to the end of the file
    dropped UINTEGER,             -- records the recorder dropped (events, manifest)
    problem VARCHAR,              -- what the reader found wrong, human readable; NULL = healthy
    indexed_end UBIGINT,          -- end of the last indexed record (incremental resumes here)
    mtime_ns BIGINT,              -- st_mtime_ns when indexed (0: it changed while being indexed)
    stamp_crc UBIGINT             -- CRC32 of its header and footer windows (epreplay.index.check)
);

-- One row per CALL record (per rank and hooked call); (buffer, seq) joins one collective across ranks.
CREATE TABLE calls (
    rank SMALLINT, buffer USMALLINT, seq UINTEGER, step INTEGER, layer SMALLINT, op op_t,
    level UTINYINT,               -- epreplay.format.records.Level (1 counts .. 4 payload)
    tokens UINTEGER,              -- T of the calling rank
    shard_offset UBIGINT,         -- byte offset of the record in shards/rank-NNNNN.eprs (open_shard(..).read_at)
    shard_length UINTEGER,        -- bytes of the record on disk (header frame + data frame)
    start_ns BIGINT,              -- wall clock (time.time_ns) at entry on the calling host
    duration_ns BIGINT,           -- -1 unknown
    status status_t, error VARCHAR
);

-- Recorder events (flight dumps, drops, capture switched off).
CREATE TABLE events (rank SMALLINT, shard_offset UBIGINT, start_ns BIGINT, reason VARCHAR, detail VARCHAR);

-- (t, k) routing slots per expert, summed over ranks: one row per (step, layer, expert) with tokens > 0.
CREATE TABLE expert_load (step INTEGER, layer SMALLINT, expert SMALLINT, tokens INTEGER);

-- The same per sending rank (which ranks send to an expert), one row per (step, layer, src_rank)
-- with a list of E counts: tokens[e + 1] = slots src_rank routed to expert e (DuckDB lists are
-- 1-based). A list row instead of E scalar rows: 64 ranks x 256 experts would be 16k rows per
-- (step, layer); as lists the table loads ~10x faster and stays small.
CREATE TABLE expert_load_rank (step INTEGER, layer SMALLINT, src_rank SMALLINT, tokens INTEGER[]);

-- Rows sent src -> dst by a dispatch: normal dispatch counts a token once per destination rank
-- (DeepEP's is_token_in_rank), low-latency dispatch once per (token, expert) slot. bytes = rows x
-- row bytes (hidden x element size, + fp8 scales). One row per (step, layer, src_rank, dst_rank), tokens > 0.
CREATE TABLE traffic (step INTEGER, layer SMALLINT, src_rank SMALLINT, dst_rank SMALLINT, tokens INTEGER, bytes BIGINT);

-- Per (step, layer, rank), every rank of the world present (zeros included) so max/mean is right:
-- rows sent and received (as in traffic), routing slots landing on the rank's experts, bytes received.
CREATE TABLE rank_load (step INTEGER, layer SMALLINT, rank SMALLINT, sent_tokens INTEGER,
                        recv_tokens INTEGER, recv_slots INTEGER, recv_bytes BIGINT);

-- One row: how the calls were grouped into steps (epreplay.format.steps). method: 'marked' (the job
-- marked them), 'layers-per-step' (record --layers-per-step N), 'detected' (found in the traffic:
-- recorded layer call u is indexed as step u // layers_per_step, layer u % layers_per_step) or
-- 'none' (every call in step 0). detail: why, in words.
CREATE TABLE steps (method VARCHAR, layers_per_step INTEGER, detail VARCHAR);

-- Replays (loaded from RUN/replays/<id>.json by epreplay.index.build.load_replay_report).
CREATE TABLE replays (
    replay VARCHAR, run_id VARCHAR, created VARCHAR, backend VARCHAR, device VARCHAR, payload VARCHAR,
    virtual_ranks SMALLINT, physical_ranks SMALLINT, calls UINTEGER, scheduled UINTEGER,
    divergences UINTEGER, stopped VARCHAR, wall_s DOUBLE, exit_code UTINYINT, verdict VARCHAR,
    path VARCHAR                  -- report path relative to the run directory
);

-- One row per divergence of a replay (report's divergence_list; at most 1000 per replay).
CREATE TABLE divergences (
    replay VARCHAR, call UINTEGER, buffer USMALLINT, seq UINTEGER, step INTEGER, layer SMALLINT,
    op VARCHAR, rank SMALLINT, phys_rank SMALLINT, kind VARCHAR,
    token INTEGER, src_rank SMALLINT, expert SMALLINT,  -- -1 unknown
    expected VARCHAR, got VARCHAR, detail VARCHAR
);

-- Per rank: how far its host clock is from the reference node's (epreplay.format.clock: estimated from
-- the end times of collectives, which all ranks leave together). Ranks of one node share a clock:
-- offset_ns is the node's (what is applied), rank_offset_ns the rank's own estimate. One node:
-- every offset 0. Cross-rank times are read aligned: start_ns - offset_ns (view aligned_calls).
CREATE TABLE clock (rank SMALLINT, node SMALLINT, host VARCHAR, offset_ns BIGINT,
                    rank_offset_ns BIGINT, calls UINTEGER);

-- calls with at_ns, the call's start on the reference node's clock (straggler, lateness views).
CREATE VIEW aligned_calls AS
SELECT c.*, c.start_ns - coalesce(k.offset_ns, 0) AS at_ns FROM calls c LEFT JOIN clock k USING (rank);
