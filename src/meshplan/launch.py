"""Start N worker processes on this machine, as torchrun would, and stop them all on Ctrl-C.

Used by ``meshplan finetune`` (real subprocesses) and ``meshplan.testing`` (the environment).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from typing import IO, Callable, Mapping, Sequence, TextIO

# Seconds a worker gets to exit after SIGTERM before it is killed.
_GRACE_SECONDS = 10.0
# Seconds the copying of the stopped workers' last output may take, all workers together.
_COPY_SECONDS = 2.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_environment(rank: int, world_size: int, port: int, *, nnodes: int = 1, threads: int = 1) -> dict[str, str]:
    """The environment variables a torchrun worker of this rank would see."""
    local_world_size = world_size // nnodes
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank % local_world_size),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "NODE_RANK": str(rank // local_world_size),
        "GROUP_RANK": str(rank // local_world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        # Several workers share a few cores: a fixed share each avoids oversubscription.
        "OMP_NUM_THREADS": str(threads),
    }


def warn_if_restarts_share_the_rendezvous_store(environ: Mapping[str, str] | None = None) -> None:
    """Warns (on rank 0) when torchrun will restart workers that share its rendezvous store (pytorch/pytorch#135712).

    torchrun (and ``accelerate launch``, which runs it) lends its c10d rendezvous store to the
    workers unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 is set in the launcher's environment; it
    then tells them so with TORCHELASTIC_USE_AGENT_STORE=True. Restarted workers can read the dead
    attempt's addresses from that store and hang while creating the process group. Called by the
    Lightning strategies and ``meshplan.accelerator()`` before any process group exists.
    """
    environ = os.environ if environ is None else environ
    restarts = int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts > 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and environ.get("RANK") == "0":
        warnings.warn(
            f"torchrun --max-restarts {restarts} shares its rendezvous store with the workers: a restarted job can "
            f"read the failed attempt's addresses and hang while it starts (pytorch/pytorch#135712). Launch torchrun "
            f"(or accelerate launch) with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment.",
            stacklevel=3,
        )


def run_workers(command: Sequence[str], nprocs: int, *, threads: int = 1, env: dict[str, str] | None = None,
                max_restarts: int = 0, output: TextIO | None = None, pass_fds: Sequence[int] = (),
                say: Callable[[str], None] | None = None) -> int:
    """Runs ``command`` in ``nprocs`` workers and returns the job's exit code.

    The workers' standard output and error go to ``output`` (a file) when given, each line
    prefixed with the worker's rank as ``[worker N] `` (two failing workers write their tracebacks
    at once; the prefix keeps them apart), else to this process's; ``pass_fds`` are file
    descriptors the workers inherit. The launcher's own lines
    (workers started, restarts) go to ``say``, standard error by default.

    The first worker to fail stops the others (its exit code is returned; 128+N for a worker
    killed by signal N). With ``max_restarts``, as with torchrun's, every worker is then started
    again, up to that many times; each attempt sees its number in MESHPLAN_RESTART_COUNT and a
    fresh port. Ctrl-C, SIGTERM or SIGHUP stops every worker this call started, and returns 130.
    Workers run in sessions of their own, so a terminal's Ctrl-C reaches this process alone and
    the shutdown is orderly; on Linux they are also killed if this process dies.
    """
    say = say or _print_to_stderr
    for attempt in range(max_restarts + 1):
        if output is not None:
            print(f"{ATTEMPT_MARK}{attempt} ===", file=output, flush=True)
        code = _run_attempt(command, nprocs, threads, {**(env or {}), "MESHPLAN_RESTART_COUNT": str(attempt)},
                            output, tuple(pass_fds), say)
        if code in (0, 130) or attempt == max_restarts:
            return code
        say(f"meshplan: a worker failed (exit code {code}); restarting every worker "
            f"({attempt + 1} of {max_restarts} restarts)")
    return code


# Written to ``output`` before each attempt, so that a log shows where the last attempt began.
ATTEMPT_MARK = "=== meshplan: attempt "


def _print_to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _run_attempt(command: Sequence[str], nprocs: int, threads: int, env: dict[str, str], output: TextIO | None,
                 pass_fds: tuple[int, ...], say: Callable[[str], None]) -> int:
    port = free_port()
    workers: list[subprocess.Popen] = []
    copiers: list[threading.Thread] = []
    handlers = {number: signal.signal(number, _raise_keyboard_interrupt) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for rank in range(nprocs):
            worker_env = {**os.environ, **env, **worker_environment(rank, nprocs, port, threads=threads)}
            workers.append(subprocess.Popen(list(command), env=worker_env, start_new_session=True,
                                            preexec_fn=_die_with_parent, pass_fds=pass_fds,
                                            stdout=subprocess.PIPE if output is not None else None,
                                            stderr=subprocess.STDOUT if output is not None else None))
            if output is not None:
                copiers.append(_copy_prefixed(workers[-1].stdout, output, f"[worker {rank}] "))
        say(f"meshplan: started {nprocs} workers (pids {' '.join(str(w.pid) for w in workers)})")
        code = _wait(workers)
        return 128 - code if code < 0 else code
    except KeyboardInterrupt:
        say("meshplan: interrupted, stopping every worker")
        return 130
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave workers behind.
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop(workers)
        # A worker's own child may still hold its pipe open: the copiers get a short while to finish, no more.
        deadline = time.monotonic() + _COPY_SECONDS
        for copier in copiers:
            copier.join(timeout=max(0.0, deadline - time.monotonic()))
        signal.signal(signal.SIGINT, interrupt)
        for number, handler in handlers.items():
            signal.signal(number, handler)


# One lock for every copier: a line is written whole, never inside another worker's line.
_OUTPUT_LOCK = threading.Lock()


def _copy_prefixed(pipe: IO[bytes], output: TextIO, prefix: str) -> threading.Thread:
    """Starts a thread that copies a worker's output to ``output`` line by line, each line after ``prefix``."""
    def copy() -> None:
        with pipe:
            for line in iter(pipe.readline, b""):
                text = line.decode(errors="replace")
                with _OUTPUT_LOCK:
                    output.write(prefix + text if text.endswith("\n") else prefix + text + "\n")
                    output.flush()

    thread = threading.Thread(target=copy, name=f"meshplan output {prefix.strip()}", daemon=True)
    thread.start()
    return thread


def _die_with_parent() -> None:
    """In the worker, before exec: ask Linux for SIGKILL when the launcher dies, however it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: Ctrl-C and SIGTERM still stop the workers


def _wait(workers: list[subprocess.Popen]) -> int:
    while True:
        codes = [worker.poll() for worker in workers]
        failed = [code for code in codes if code not in (None, 0)]
        if failed:
            return failed[0]
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.2)


def _stop(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    deadline = time.monotonic() + _GRACE_SECONDS
    for worker in workers:
        try:
            worker.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
