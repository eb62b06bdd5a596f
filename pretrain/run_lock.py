"""One writer per run folder: `.pretrain.lock` in --output, held by the process that writes the run (rank 0
under torchrun) for as long as it runs.

The lock is a POSIX record lock (fcntl.lockf) on that file, so the kernel (or the NFS lock manager) drops it
when the holder dies, even by kill -9, and forked loader workers do not inherit it. The file's text names the
holder (pid, host, start time, command, torchrun job) for the message the next process shows. A lock file
left by a killed process is taken over with a note; one left by an earlier attempt of the same torchrun job
(an elastic restart) is taken over quietly. The holder deletes the file when it ends.

POSIX locks belong to the process and drop when it closes *any* descriptor of the file: the holder never
opens the lock file a second time (read it through RunLock.fd)."""
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from himae_nnunet.core.errors import UserError
from himae_nnunet.pretrain.run_state import launch_info

LOCK = ".pretrain.lock"


class RunLocked(UserError):
    """Another live process writes into the same --output."""


def holder_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": " ".join(sys.argv), "launch": launch_info()}


def describe_holder(info: dict) -> str:
    if not info:
        return "a process that left no details"
    text = f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
    launch = info.get("launch")
    if launch:
        text += f" (torchrun job {launch['run_id']}, agent pid {launch['agent_pid']})"
    return text + (f": {info['command']}" if info.get("command") else "")


def read_holder(fd: int) -> dict:
    """The holder details in the lock file open as `fd` ({} if none or unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    try:
        info = json.loads(raw.decode()) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        info = {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """`with RunLock(out, say):` holds the lock of run folder `out` (which must exist) for the block."""

    def __init__(self, out: Path, say=print):
        self.path, self.say, self.fd = Path(out) / LOCK, say, None

    def __enter__(self):
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                info = read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                raise RunLocked(f"{self.path.parent} is being written by another pretraining process, "
                                f"{describe_holder(info)}; wait for it to end (or stop it), or choose another "
                                f"--output") from None
            if self._same_file(fd):
                self.fd = fd
            else:  # the holder ended and deleted the file between our open and lock: try again
                os.close(fd)
        self._note_previous(read_holder(self.fd))
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(holder_info()).encode(), 0)
        return self

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _note_previous(self, info: dict) -> None:
        """A lock file we could lock was left by a process that ended without deleting it (kill -9, power
        loss): say whose it was, unless it is our own torchrun job's earlier attempt."""
        if not info or (info.get("launch") and info["launch"] == launch_info()):
            return
        gone = info.get("host") == socket.gethostname() and not _pid_alive(info.get("pid"))
        self.say(f"note: taking over the lock {self.path} left by {describe_holder(info)}, which "
                 f"{'no longer runs' if gone else 'no longer holds it'} (killed or crashed)")

    def __exit__(self, *exc):
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting process then sees a new file
        except OSError:
            pass
        os.close(self.fd)  # closing drops the lock
        self.fd = None
