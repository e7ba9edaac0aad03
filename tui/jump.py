"""Parse what the user types after `/`: an expert, a rank, a step (range) or a layer.

Pure (no textual): `parse_jump("e12")`, `parse_jump("rank 5")`, `parse_jump("s3:10")`,
`parse_jump("l4")`; a bare number means `default` (expert on the hot-experts pane, rank on the
traffic and timeline panes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from epreplay.errors import UsageError

KINDS = {"e": "expert", "expert": "expert", "r": "rank", "rank": "rank", "s": "step", "step": "step",
         "steps": "step", "l": "layer", "layer": "layer"}
_RE = re.compile(r"^\s*([a-z]*)\s*(-?\d+)\s*(?::\s*(-?\d+))?\s*$")


@dataclass(frozen=True)
class Jump:
    """kind: expert | rank | step | layer; value; end: exclusive end of a step range (else None)."""

    kind: str
    value: int
    end: int | None = None


def parse_jump(text: str, *, default: str = "expert") -> Jump:
    """Parse `/` input; UsageError (shown as a notification) naming the input and the forms."""
    m = _RE.match(text.lower())
    forms = "e12 (expert), r5 (rank), s3 or s3:10 (steps), l4 (layer)"
    if not m:
        raise UsageError(f"{text!r}: type {forms}")
    word, value, end = m.group(1), int(m.group(2)), m.group(3)
    kind = KINDS.get(word, None) if word else default
    if kind is None:
        raise UsageError(f"{text!r}: unknown target {word!r}; type {forms}")
    if end is not None and kind != "step":
        raise UsageError(f"{text!r}: a range a:b is only for steps (s3:10)")
    if kind == "step":
        stop = int(end) if end is not None else value + 1
        if stop <= value:
            raise UsageError(f"{text!r}: empty step range; the end is exclusive (s3:10 = steps 3..9)")
        return Jump("step", value, stop)
    return Jump(kind, value)
