"""Which job, and which node of it, an `epreplay record` launcher is part of — without a process
group: from the command it runs (torchrun's options) and the environment.

A job of N nodes is recorded by N launchers, one per node, each writing RUN on its own disk;
`epreplay merge` then joins the parts. For that, every launcher must give its shards the same run
id without talking to the others, so the id is derived from what every node's command and
environment share:

    the job's name  torchrun --rdzv-id (or PET_RDZV_ID / TORCHELASTIC_RUN_ID), else SLURM_JOB_ID
    where it meets  --rdzv-endpoint, else --master-addr:--master-port (or PET_* / MASTER_* env)
    its size        --nnodes

    job = job_of(cmd, os.environ)     # pure: a Job (nnodes, node_rank, key, source)
    run_id = job.run_id()             # the same on every node of the job; None for one node

The same job name, endpoint and size give the same id again on a later run: give each job its own
--rdzv-id (a scheduler's job id is ideal) or `epreplay record --run-id`. A shared filesystem is
unaffected: the launchers then write one directory and join the run the first one created.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

# torchrun options that take no value (every other option takes one, as --opt V or --opt=V).
_FLAGS = {"--standalone", "--no-python", "--no_python", "-m", "--module", "--run-path", "--run_path"}
_LAUNCHERS = ("torchrun", "torch.distributed.run", "torch.distributed.launch")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class Job:
    """What a launcher knows of the job its command starts.

    Attributes:
        nnodes: nodes in the job (the largest of torchrun's --nnodes MIN:MAX); 1 when unknown.
        node_rank: this launcher's node (torchrun --node-rank; -1 when the rendezvous assigns
            it: each rank then reads GROUP_RANK, see capture.session).
        name: the job's name (rendezvous id or scheduler job id), "" when none.
        endpoint: where the nodes meet (host:port), "" when unknown.
        source: in words, where name and endpoint came from (for the launcher's message).
    """

    nnodes: int = 1
    node_rank: int = -1
    name: str = ""
    endpoint: str = ""
    source: str = ""

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1

    def run_id(self) -> str | None:
        """The run id every node derives alike ("<name>-<10 hex digits>"); None for a one-node
        job or one with neither a name nor an endpoint (nothing shared to derive it from)."""
        if not self.multi_node or not (self.name or self.endpoint):
            return None
        key = f"{self.name}|{self.endpoint}|{self.nnodes}"
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.name).strip("-.")[:40] or "job"
        return f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def check_run_id(run_id: str) -> str:
    """`run_id` when it can name a run (letters, digits, '.', '_', '-'; 1-100 characters).

    Raises:
        ValueError: naming the value and what is allowed.
    """
    if not _RUN_ID_RE.match(run_id):
        raise ValueError(f"--run-id {run_id!r}: use 1-100 letters, digits, '.', '_' or '-' "
                         f"(starting with a letter or digit)")
    return run_id


def torchrun_options(cmd: Sequence[str]) -> dict[str, str] | None:
    """torchrun's own options in `cmd` ("nnodes" -> "2", "node_rank" -> "1", ...; dashes read
    as underscores), or None when `cmd` does not start torchrun / python -m torch.distributed.run.
    Options after the script (the script's own) are not torchrun's and are not read."""
    args = list(cmd)
    start = None
    if args and os.path.basename(args[0]) == "torchrun":
        start = 1
    else:
        for i in range(len(args) - 1):
            if args[i] == "-m" and args[i + 1] in _LAUNCHERS[1:]:
                start = i + 2
                break
    if start is None:
        return None
    out: dict[str, str] = {}
    i = start
    while i < len(args):
        tok = args[i]
        if not tok.startswith("-"):
            break  # the script: what follows is its own
        if tok in _FLAGS:
            if tok in ("-m", "--module"):
                break  # the next token is the module to run
            out[tok.lstrip("-").replace("-", "_")] = "1"
            i += 1
            continue
        if "=" in tok:
            name, value = tok.split("=", 1)
            i += 1
        else:
            name, value = tok, args[i + 1] if i + 1 < len(args) else ""
            i += 2
        out[name.lstrip("-").replace("-", "_")] = value
    return out


def _max_nodes(text: str) -> int:
    """--nnodes "N" or "MIN:MAX" -> the most nodes; 1 when unreadable."""
    try:
        return max(int(p) for p in text.split(":") if p.strip())
    except ValueError:
        return 1


def job_of(cmd: Sequence[str], environ: Mapping[str, str]) -> Job:
    """The job `cmd` starts (see the module docstring). Pure: reads only its arguments."""
    opts = torchrun_options(cmd)
    if opts is None:
        return Job()

    def opt(name: str, default: str = "") -> str:
        # torchrun reads each option from PET_<NAME> when it is not on the command line
        return opts.get(name) or environ.get(f"PET_{name.upper()}", "") or default

    if opts.get("standalone"):
        return Job(node_rank=0, source="torchrun --standalone")
    nnodes = _max_nodes(opt("nnodes", "1"))
    node = opt("node_rank")
    node_rank = int(node) if node.lstrip("-").isdigit() else (-1 if nnodes > 1 else 0)
    if opt("rdzv_backend", "static") != "static" and "node_rank" not in opts:
        node_rank = -1 if nnodes > 1 else 0  # an elastic rendezvous assigns node ranks itself
    name, named_by = opt("rdzv_id"), "--rdzv-id"
    if not name or name == "none":
        name, named_by = environ.get("TORCHELASTIC_RUN_ID", ""), "TORCHELASTIC_RUN_ID"
    if not name or name == "none":
        name, named_by = environ.get("SLURM_JOB_ID", ""), "SLURM_JOB_ID"
    endpoint = opt("rdzv_endpoint")
    if not endpoint:
        addr = opt("master_addr") or environ.get("MASTER_ADDR", "")
        port = opt("master_port") or environ.get("MASTER_PORT", "")
        endpoint = f"{addr}:{port}" if addr and port else ""
    said = [f"{named_by} {name}"] if name else []
    said += [f"endpoint {endpoint}"] if endpoint else []
    return Job(nnodes=nnodes, node_rank=node_rank, name=name, endpoint=endpoint,
               source=f"torchrun {', '.join(said + [f'--nnodes {nnodes}'])}")


def node_of(environ: Mapping[str, str], launcher_node: int) -> int:
    """The node a rank runs on: torchrun's GROUP_RANK (the rendezvous's word), else SLURM's
    node id, else what the launcher was told (`launcher_node`, -1 unknown)."""
    for name in ("GROUP_RANK", "SLURM_NODEID"):
        text = environ.get(name, "")
        if text.isdigit():
            return int(text)
    return launcher_node
