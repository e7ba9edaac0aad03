"""epreplay.replay: coordinated replay of a recorded run on the same or a smaller set of ranks.

    from epreplay.replay import replay_run
    report = replay_run("runs/demo", ranks=4)      # -> ReplayReport
    report.exit_code, report.first_divergence, report.to_dict()
"""
from __future__ import annotations

from typing import Any


def replay_run(run_dir: Any, ranks: int | None = None, **kwargs: Any) -> Any:
    """See epreplay.replay.driver.replay_run (imported lazily: keeps `import epreplay.replay` light)."""
    from epreplay.replay.driver import replay_run as _replay_run

    return _replay_run(run_dir, ranks, **kwargs)


__all__ = ["replay_run"]
