"""Joining the ranks of `mlx.launch`, and what each rank is: a bounded join (one line on
timeout), the group a sharded model runs on, rank 0 as the one that prints and samples."""

import os
import subprocess
import sys
from typing import Optional

import mlx.core as mx
import numpy as np

from ..errors import LlavaError

# Seconds a rank waits for the others to join before giving up (one line, exit non-zero).
JOIN_TIMEOUT = float(os.environ.get("LLAVA_MLX_JOIN_TIMEOUT", "60"))


def launched() -> bool:
    """Whether this process was started by mlx.launch (or mpirun) as one of several ranks."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and os.path.isfile(hostfile):  # `mlx.launch -n 1` writes an empty one
        with open(hostfile) as f:
            return f.read().strip() != ""
    return any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))


def world(timeout: float = JOIN_TIMEOUT) -> Optional[mx.distributed.Group]:
    """The group of all ranks when launched with more than one, else None.

    The ring backend's listening side waits for its peers forever, holding the interpreter,
    so a watchdog process ends this one with a one-line error after `timeout` seconds.
    """
    if not launched():
        return None
    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    message = (
        f"error: rank {rank}: the other ranks did not join within {timeout:g} s "
        "(check the hostfile's addresses and ports, that every host runs the command, and the firewall)"
    )
    watchdog = subprocess.Popen(
        [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(timeout), message], stdin=subprocess.DEVNULL
    )
    try:
        group = mx.distributed.init()
        mx.eval(mx.distributed.all_sum(mx.array(1), group=group))  # everyone is here
    except RuntimeError as e:
        raise LlavaError(f"rank {rank} could not join the other ranks: {str(e).splitlines()[0]}") from None
    finally:
        watchdog.kill()
        watchdog.wait()
    return group if group.size() > 1 else None


WATCHDOG = """
import os, signal, sys, time
pid, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
time.sleep(timeout)
print(message, file=sys.stderr, flush=True)
os.kill(pid, signal.SIGKILL)  # the stuck call holds the interpreter: no handler could run
"""


def group_of(model) -> Optional[mx.distributed.Group]:
    sharding = getattr(model, "sharding", None)
    return sharding.group if sharding else None


def label(model) -> str:
    """'rank r/n ' for a sharded model's messages, '' in a single process."""
    group = group_of(model)
    return f"[rank {group.rank()}/{group.size()}] " if group else ""


def is_main(model) -> bool:
    """Whether this process prints the answer (rank 0, or the only process)."""
    group = group_of(model)
    return group is None or group.rank() == 0


def agree_seed(model, seed: Optional[int]) -> Optional[int]:
    """Every rank samples the same tokens: without a seed, rank 0's random one is used."""
    group = group_of(model)
    if group is None or seed is not None:
        return seed
    mine = int(np.random.default_rng().integers(0, 2**31)) if group.rank() == 0 else 0
    return int(mx.distributed.all_sum(mx.array(mine), group=group).item())


def settle(model):
    """Finish the step mlx-lm schedules ahead, so no rank leaves a collective half done."""
    if group_of(model) is not None:
        from mlx_lm.generate import generation_stream

        mx.synchronize(generation_stream)
        mx.synchronize()
