"""The writer process: hashing, encoding, compression and shard writes, off the job's process.

Why a process: the job's Python thread and a writer thread share one GIL. Building and encoding
a record is mostly interpreted Python (0.3 ms at T=64, 2 ms at T=4096 on one core), and every
time the job comes back from a kernel launch, a collective or DeepEP's host wait it may queue
behind that work. On a GPU step of 0.1-1 ms that is the whole overhead. Here the job's side keeps
a courier thread that waits on CUDA events (GIL released), views the staged host memory as numpy
and writes it to a pipe (GIL released); everything else runs here.

Protocol over the child's stdin: one message after another, framed as wire.py says.
Messages, in the recorder's queue order:
  ("init", config_json, rank, world_size)    first, once
  ("call", PackedCall)                        batched: hashed together, built, written (or ringed)
  ("hung", PackedCall) ("event", meta) ("dump", reason, detail, origin) ("graph", [built, ...])
  ("close",)                                  write held-back records and the footer, reply;
                                              then the process waits for the next "init"
Replies on the child's stdout, same framing: ("facts", dict) after "close", or ("off", reason)
when the sink failed (disk full...), after which the child exits and the job's next write fails.
EOF without "close" means the job died: records received are written, no footer (as a crash
of the writer thread itself would leave it), so readers see an unclosed shard.

Signals: the job decides when capture ends, the writer only follows (close, or EOF when the job
dies). So a Ctrl-C, which a terminal sends to its whole foreground process group, must not
reach it: it starts in a session of its own, and ignores SIGINT besides (a SIGINT sent to its
pid). Killed mid-session it would lose what the job already handed over, and print a
KeyboardInterrupt traceback per rank over the job's own message.
"""
from __future__ import annotations

import json
import os
import pickle
import select
import signal
import subprocess
import sys
import time
from typing import Any, BinaryIO

from epreplay.capture.wire import _grow_pipe, recv, send, send_many

# Messages read at once before hashing: CPU fingerprints of a batch are one torch pass per format.
READ_BATCH = 64
# How often a ring writer looks for new frames when nothing wakes it: the job never wakes it per
# call (that would be a syscall on the job's thread), and the ring holds seconds of traffic.
POLL_S = 0.005
ENV_RING_FD = "EPREPLAY_RING_FD"
# The writer's scheduling niceness, EPREPLAY_WRITER_NICE (default 0: the job's priority). A
# positive value makes the writer yield to the job's threads where both want the same cores (a
# host whose cores the job fills): the job's steps then keep their speed, but a writer that falls
# behind fills the ring and calls are dropped and counted (at nice 10 on a loaded 2-core host,
# most `fingerprints` calls were), so it is the operator's choice, not the default.
WRITER_NICE = 0


# --- the job's side ------------------------------------------------------------------------------
class WriterProcess:
    """The job's handle on a writer process: start a session, send messages, close it for the
    facts. A process whose session closed cleanly waits for the next one (`acquire`), so a job
    that starts and stops capture many times pays the process start (~0.3 s CPU) once."""

    def __init__(self, ring: Any = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EPREPLAY_CAPTURE_")}
        # No capture of the writer itself, and its own threads: one is plenty for the codec.
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.ring = ring  # shm_ring.ShmRing the process reads (ring sessions), inherited by fd
        fds: tuple[int, ...] = ()
        if ring is not None:
            env[ENV_RING_FD] = str(ring.fd)
            fds = (ring.fd,)
        self.proc = subprocess.Popen([sys.executable, "-m", "epreplay.capture.writer_proc"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     close_fds=True, pass_fds=fds, bufsize=0,
                                     # out of the terminal's process group from its first
                                     # instruction: main() can only ignore SIGINT once Python runs
                                     start_new_session=True)
        self.fd = self.proc.stdin.fileno()
        self.pid = os.getpid()  # the job process that owns it (a fork's child must not use it)
        _grow_pipe(self.fd)

    def begin(self, config: Any, *, rank: int, world_size: int, resume: bool = False) -> None:
        """Start a session: records of this rank into config's run (resume: a writer before
        this one died; continue its shard and ring)."""
        from dataclasses import asdict

        body = asdict(config)
        body["level"] = int(config.level)
        send(self.fd, ("init", json.dumps(body), rank, world_size, self.ring is not None, resume))

    def send_many(self, msgs: list[Any]) -> None:
        """Raises OSError (BrokenPipeError) when the process has gone."""
        send_many(self.fd, msgs)

    def why_off(self, timeout: float = 2.0) -> str:  # noqa: D401
        """After a failed send: the reason the process gave, or how it ended."""
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if ready:
                reply = recv(self.proc.stdout)
                if isinstance(reply, tuple) and reply and reply[0] == "off":
                    return str(reply[1])
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        code = self.proc.poll()
        return f"writer process ended (exit code {code})" if code is not None else "writer process not answering"

    def close(self, timeout: float) -> dict[str, Any]:
        """End the session: footer, then the sink's facts; the process then waits for the next
        session (kept by `release`). Raises RuntimeError with the reason."""
        try:
            send(self.fd, ("close",))
        except OSError:
            raise RuntimeError(self.why_off()) from None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.kill()
            raise RuntimeError(f"writer process did not finish within {timeout:g}s at close")
        try:
            reply = recv(self.proc.stdout)
        except (EOFError, OSError) as exc:
            self.kill()
            raise RuntimeError(f"writer process ended without its facts ({exc})") from None
        if reply[0] == "off":
            self.kill()
            raise RuntimeError(str(reply[1]))
        _idle.append(self)
        return reply[1]

    def alive(self) -> bool:
        return self.proc.poll() is None and self.pid == os.getpid()

    def kill(self) -> None:
        if self.proc.poll() is None and self.pid == os.getpid():
            self.proc.kill()
            self.proc.wait()


_idle: list[WriterProcess] = []  # writer processes between sessions, most recent last


def acquire_ring(config: Any, *, rank: int, world_size: int, cuda: bool = False) -> WriterProcess:
    """A ring writer process for a new session: an idle one of this process whose ring has the
    configured sizes (its positions go on from where the last session ended), or a new one."""
    from epreplay.capture.ring_thread import ring_sizes
    from epreplay.capture.shm_ring import ShmRing, aligned

    frames, dev = ring_sizes(config, cuda)
    sizes = (aligned(max(frames, 4096)), aligned(dev))
    return _reuse(config, rank, world_size,
                  lambda p: p.ring is not None and (p.ring.capacity, p.ring.dev_capacity) == sizes) \
        or _started(WriterProcess(ring=ShmRing.create(frames, dev)), config, rank, world_size)


def acquire(config: Any, *, rank: int, world_size: int) -> WriterProcess:
    """A writer process for a new session: an idle one of this process, or a new one."""
    return _reuse(config, rank, world_size, lambda p: p.ring is None) \
        or _started(WriterProcess(), config, rank, world_size)  # ring writers serve acquire_ring


def _reuse(config: Any, rank: int, world_size: int, fits: Any) -> WriterProcess | None:
    """The most recent idle writer process that fits and takes the new session, or None."""
    for proc in [p for p in _idle if fits(p)][::-1]:
        _idle.remove(proc)
        if proc.alive():
            try:
                return _started(proc, config, rank, world_size)
            except OSError:
                proc.kill()
    return None


def _started(proc: WriterProcess, config: Any, rank: int, world_size: int) -> WriterProcess:
    proc.begin(config, rank=rank, world_size=world_size)
    return proc


# --- the writer process --------------------------------------------------------------------------
def _config(body_json: str) -> Any:
    from epreplay.capture.config import CaptureConfig
    from epreplay.format.records import Level

    body = json.loads(body_json)
    body["level"] = Level(body["level"])
    return CaptureConfig(**body)


def _batch(fh: BinaryIO) -> list[Any]:
    """One message (blocking), then whatever else is already waiting, up to READ_BATCH. At the
    end of the stream the messages read so far come back first, then EOFError on the next call."""
    out = [recv(fh)]
    while len(out) < READ_BATCH and out[-1][0] != "close":
        # readinto on a raw pipe returns what is there; select says whether a message started
        if not select.select([fh], [], [], 0)[0]:
            break
        try:
            out.append(recv(fh))
        except EOFError:
            break  # the next call meets it again, after these are written
    return out


def serve(inp: BinaryIO, out_fd: int) -> int:
    """The writer process's loop: one capture session after another (see the module
    docstring); returns its exit code."""
    ring = None
    if os.environ.get(ENV_RING_FD):
        from epreplay.capture.shm_ring import ShmRing

        ring = ShmRing(int(os.environ[ENV_RING_FD]))
    while True:
        try:
            kind, body_json, rank, world, *rest = recv(inp)
        except EOFError:
            return 0  # the job ended between sessions
        if kind != "init":
            print(f"epreplay writer: expected init, got {kind!r}", file=sys.stderr)
            return 2
        if rest and rest[0]:
            ended = _ring_session(inp, out_fd, _config(body_json), rank, world, ring, bool(rest[1]))
        else:
            ended = _session(inp, out_fd, _config(body_json), rank, world)
        if ended != "closed":
            return 0 if ended == "eof" else 1


def _session(inp: BinaryIO, out_fd: int, config: Any, rank: int, world: int) -> str:
    """One capture session, "init" to "close": "closed", "eof" (the job died) or "failed"."""
    from epreplay.capture.build import build_calls
    from epreplay.capture.manifest import write_marker
    from epreplay.capture.sink import Sink

    def tell_others(reason: str, detail: str) -> None:
        try:
            write_marker(config.run_dir, reason, detail, rank)
        except OSError:
            pass  # a full disk cannot stop this rank's own dump, only the others' signal

    cpu0 = time.process_time()
    sink = Sink(config, rank=rank, world_size=world, on_trigger=tell_others)
    while True:
        try:
            msgs = _batch(inp)
        except EOFError:
            try:
                sink.abandon()
            except Exception:  # noqa: BLE001
                pass
            return "eof"
        try:
            calls = [m[1] for m in msgs if m[0] == "call"]
            built = iter(build_calls(calls)) if calls else iter(())
            for msg in msgs:
                kind = msg[0]
                if kind == "call":
                    sink.call(next(built))
                elif kind == "hung":
                    sink.call(build_calls([msg[1]])[0])
                elif kind == "event":
                    sink.event(*msg[1:])
                elif kind == "dump":
                    sink.dump(*msg[1:])
                elif kind == "graph":
                    sink.graph(msg[1])
                elif kind == "close":
                    sink.close()
                    send(out_fd, ("facts", dict(sink.facts(), cpu_s=time.process_time() - cpu0)))
                    return "closed"
        except Exception as exc:  # noqa: BLE001 - the job logs it (one line) and goes on uncaptured
            send(out_fd, ("off", f"writer: {type(exc).__name__}: {exc}"))
            return "failed"


def _ring_session(inp: BinaryIO, out_fd: int, config: Any, rank: int, world: int, ring: Any,
                  resume: bool) -> str:
    """One capture session fed through the ring (ring_consumer.py): frames are read every
    POLL_S or when a control message arrives; "closed", "eof" (the job died: every published
    frame is still written) or "failed"."""
    from epreplay.capture.manifest import write_marker
    from epreplay.capture.ring_consumer import RingConsumer
    from epreplay.capture.sink import Sink

    def tell_others(reason: str, detail: str) -> None:
        try:
            write_marker(config.run_dir, reason, detail, rank)
        except OSError:
            pass

    cpu0 = time.process_time()
    try:
        sink = Sink(config, rank=rank, world_size=world, on_trigger=tell_others, resume=resume)
        consumer = RingConsumer(ring, sink, resume=resume)
    except Exception as exc:  # noqa: BLE001
        send(out_fd, ("off", f"writer: {type(exc).__name__}: {exc}"))
        return "failed"
    while True:
        try:
            if select.select([inp], [], [], POLL_S)[0]:
                try:
                    msgs = _batch(inp)
                except EOFError:
                    consumer.finish()  # the job died: what it published is still here
                    sink.abandon()
                    return "eof"
                for msg in msgs:
                    if msg[0] == "close":
                        consumer.finish()
                        sink.close()
                        send(out_fd, ("facts", dict(sink.facts(), cpu_s=time.process_time() - cpu0)))
                        return "closed"
                    consumer.control(msg[1], msg[2])
            consumer.drain()
        except Exception as exc:  # noqa: BLE001 - the job logs it (one line) and goes on uncaptured
            send(out_fd, ("off", f"writer: {type(exc).__name__}: {exc}"))
            return "failed"


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the job decides (module docstring: Signals)
    try:
        nice = int(os.environ.get("EPREPLAY_WRITER_NICE", WRITER_NICE))
        if nice:
            os.nice(nice)
    except (OSError, ValueError):  # not allowed, or a bad value: the job's priority
        pass
    inp = open(0, "rb", buffering=0)
    out_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints (a library's warning) must not corrupt the reply channel
    try:
        return serve(inp, out_fd)
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
