"""Write-then-rename, the one way this package replaces a file: a reader sees the old file or the new one,
never half of one, and a failed or killed write leaves at most a temporary `.NAME.tmpPID` beside it."""
import os
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = "."


def temporary_beside(path: Path) -> Path:
    """`.NAME.tmpPID` in the same folder (same filesystem, so the rename is atomic; one per process)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.tmp{os.getpid()}")


@contextmanager
def replacing(path: str | os.PathLike):
    """Yields a temporary path to write; when the block succeeds it replaces `path`, else it is deleted."""
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)
