"""The named SQL of epreplay.index.queries, one constant per query, with $parameters.

$lo/$hi: a step range [lo, hi) (LO, HI: every step); $layer: one layer or ALL. Tables and
columns: epreplay/index/schema.sql.
"""
from __future__ import annotations

LO, HI = -(2**31), 2**31 - 1  # $lo/$hi of "every step" (the int32 step column's range)
ALL = -2  # $layer value meaning "every layer" (-1 is a real value: layer unknown)

_RANGE = "step >= $lo AND step < $hi AND ($layer = -2 OR layer = $layer)"

HOT_EXPERTS = f"""
SELECT expert, sum(tokens)::BIGINT AS tokens, sum(sum(tokens)) OVER () ::BIGINT AS total
FROM expert_load WHERE {_RANGE}
GROUP BY expert ORDER BY tokens DESC, expert LIMIT $top"""

HOT_EXPERTS_BY_LAYER = """
SELECT layer, expert, tokens, total FROM (
  SELECT layer, expert, sum(tokens)::BIGINT AS tokens,
         sum(sum(tokens)) OVER (PARTITION BY layer)::BIGINT AS total,
         row_number() OVER (PARTITION BY layer ORDER BY sum(tokens) DESC, expert) AS pos
  FROM expert_load WHERE step >= $lo AND step < $hi GROUP BY layer, expert)
WHERE pos <= $top ORDER BY layer, pos"""

EXPERT_OVER_TIME = f"""
WITH tot AS (SELECT step, sum(tokens)::BIGINT AS total FROM expert_load WHERE {_RANGE} GROUP BY step),
     one AS (SELECT step, sum(tokens)::BIGINT AS tokens FROM expert_load
             WHERE {_RANGE} AND expert = $expert GROUP BY step)
SELECT tot.step, coalesce(one.tokens, 0)::BIGINT AS tokens, tot.total
FROM tot LEFT JOIN one USING (step) ORDER BY tot.step"""

LOAD_MATRIX = """
SELECT layer, expert, sum(tokens)::BIGINT AS tokens FROM expert_load
WHERE step >= $lo AND step < $hi GROUP BY layer, expert"""

RANK_LOAD = f"""
SELECT rank, sum(sent_tokens)::BIGINT AS sent, sum(recv_tokens)::BIGINT AS recv,
       sum(recv_slots)::BIGINT AS slots, sum(recv_bytes)::BIGINT AS recv_bytes
FROM rank_load WHERE {_RANGE} GROUP BY rank ORDER BY rank"""

IMBALANCE_PER_LAYER = """
WITH per_rank AS (
  SELECT layer, rank, sum(recv_tokens) AS recv, sum(recv_slots) AS slots FROM rank_load
  WHERE step >= $lo AND step < $hi GROUP BY layer, rank),
agg AS (
  SELECT layer, max(recv)::BIGINT AS max_recv, avg(recv) AS mean_recv, arg_max(rank, recv) AS max_rank,
         max(slots)::BIGINT AS max_slots, avg(slots) AS mean_slots, arg_max(rank, slots) AS max_slots_rank
  FROM per_rank GROUP BY layer),
per_step AS (
  SELECT layer, step, max(recv_tokens) / nullif(avg(recv_tokens), 0) AS imb,
         max(recv_slots) / nullif(avg(recv_slots), 0) AS slots_imb FROM rank_load
  WHERE step >= $lo AND step < $hi GROUP BY layer, step),
steps AS (SELECT layer, avg(imb) AS mean_step_imb, max(imb) AS worst_imb, arg_max(step, imb) AS worst_step,
                 avg(slots_imb) AS mean_step_slots_imb
          FROM per_step GROUP BY layer)
SELECT layer, max_recv, mean_recv, max_rank, max_slots, mean_slots, max_slots_rank,
       mean_step_imb, worst_imb, worst_step, mean_step_slots_imb
FROM agg JOIN steps USING (layer) ORDER BY layer"""

TRAFFIC = f"""
SELECT src_rank, dst_rank, sum(tokens)::BIGINT AS tokens, sum(bytes)::BIGINT AS bytes
FROM traffic WHERE {_RANGE} GROUP BY src_rank, dst_rank"""

EXPERT_SENDERS = f"""
SELECT src_rank, sum(tokens[$expert + 1])::BIGINT AS tokens FROM expert_load_rank
WHERE {_RANGE} GROUP BY src_rank HAVING sum(tokens[$expert + 1]) > 0 ORDER BY tokens DESC, src_rank"""

# A straggler reaches a collective late; the other ranks wait for it inside the call, so *their*
# durations grow while its own stays short. Ranks are therefore ranked by how often they arrived
# last (at_ns: start_ns on the reference node's clock, aligned_calls in index/schema.sql — hosts'
# clocks differ by more than a call lasts), then by lateness; the duration columns show who
# waited (and a rank slow inside the call, e.g. a bad link).
STRAGGLERS = f"""
WITH c AS (
  SELECT rank, duration_ns,
         duration_ns - median(duration_ns) OVER w AS excess_ns,
         at_ns - min(at_ns) OVER w AS late_ns,
         row_number() OVER (PARTITION BY buffer, seq ORDER BY duration_ns DESC, rank) AS pos,
         row_number() OVER (PARTITION BY buffer, seq ORDER BY at_ns DESC, rank) AS arrival
  FROM aligned_calls WHERE duration_ns >= 0 AND {_RANGE} AND ($op = '' OR op::VARCHAR = $op)
  WINDOW w AS (PARTITION BY buffer, seq))
SELECT rank, count(*) FILTER (WHERE arrival = 1) AS last, count(*) FILTER (WHERE pos = 1) AS slowest,
       count(*) AS calls, avg(duration_ns) AS mean_ns, max(duration_ns) AS max_ns,
       avg(excess_ns) AS mean_excess_ns, avg(late_ns) AS mean_late_ns
FROM c GROUP BY rank ORDER BY last DESC, mean_late_ns DESC, rank LIMIT $top"""

CLOCK = "SELECT rank, node, host, offset_ns, rank_offset_ns, calls FROM clock ORDER BY rank"

SLOWEST_CALLS = f"""
SELECT buffer, seq, min(step) AS step, min(layer) AS layer, min(op)::VARCHAR AS op,
       arg_max(rank, duration_ns) AS rank, max(duration_ns) AS max_ns, median(duration_ns) AS median_ns
FROM calls WHERE duration_ns >= 0 AND {_RANGE} AND ($op = '' OR op::VARCHAR = $op)
GROUP BY buffer, seq ORDER BY max_ns DESC, buffer, seq LIMIT $top"""

TIMELINE = f"""
SELECT step, rank, sum(duration_ns)::BIGINT AS duration_ns FROM calls
WHERE duration_ns >= 0 AND {_RANGE} AND ($op = '' OR op::VARCHAR = $op)
GROUP BY step, rank"""

RUN_INFO = "SELECT * FROM runs"
SHARDS = "SELECT * FROM shards ORDER BY rank"
CALL_COUNTS = """
SELECT op::VARCHAR AS op, status::VARCHAR AS status, count(*) AS n FROM calls GROUP BY ALL ORDER BY ALL"""
STEP_LAYER_RANGE = "SELECT min(step), max(step), count(DISTINCT step), list(DISTINCT layer ORDER BY layer) FROM calls"
REPLAYS = "SELECT * FROM replays ORDER BY created, replay"
DIVERGENCES = """
SELECT * FROM divergences WHERE ($replay = '' OR replay = $replay)
ORDER BY replay, call, rank, kind LIMIT $limit"""
