"""Fault injection for tests/test_faults.py: environment variables read at fixed points of the pretraining
loop and of the checkpoint writer. Unset in normal use (then each point costs one dictionary lookup).

HIMAE_FAULT_KILL_AT_STEP=N               SIGKILL this process right after optimizer step N (1-based), before
                                         that step's log line and checkpoint
HIMAE_FAULT_KILL_IN_CHECKPOINT_WRITE=N   SIGKILL this process halfway through writing the temporary file of the
                                         checkpoint of step N (half of its bytes on disk, fsync'ed)
HIMAE_FAULT_RANK=R                       only the process with that RANK faults (default: every process)

Under torchrun the faults fire only in the first attempt (TORCHELASTIC_RESTART_COUNT unset or 0), so
`torchrun --max-restarts 1` can show the restarted job finishing.
"""
import os
import signal

KILL_AT_STEP = "HIMAE_FAULT_KILL_AT_STEP"
KILL_IN_CHECKPOINT_WRITE = "HIMAE_FAULT_KILL_IN_CHECKPOINT_WRITE"
RANK = "HIMAE_FAULT_RANK"


def _armed(var: str, step: int) -> bool:
    value = os.environ.get(var)
    if not value:
        return False
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        return False
    if os.environ.get(RANK) not in (None, "") and os.environ.get(RANK) != os.environ.get("RANK", "0"):
        return False
    return int(value) == int(step)


def die() -> None:
    """kill -9 of this process: no exception handler, no finally clause, no atexit runs."""
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill_at_step(step: int) -> None:
    if _armed(KILL_AT_STEP, step):
        die()


def kill_in_checkpoint_write(step) -> bool:
    return step is not None and _armed(KILL_IN_CHECKPOINT_WRITE, step)
