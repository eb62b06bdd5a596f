"""What a pretraining run reports while it trains: log.jsonl, TensorBoard scalars, the tqdm bar, and the
per-step values that wait on the device until the next log point."""
import json
import math
import time
from pathlib import Path

import torch

from himae_nnunet.core.atomic import write_text_atomic
from himae_nnunet.core.errors import UserError
from himae_nnunet.pretrain.run_state import LOG, last_good

SCALARS = ("loss", "lr", "grad_norm", "crops_per_s")  # the TensorBoard tags, under pretrain/


class NonFiniteLoss(UserError):
    pass


def open_log(path: Path, start: int):
    """log.jsonl for appending; entries after `start` (written by a run killed after its last checkpoint)
    are dropped so that the resumed log reads like an uninterrupted one."""
    if path.exists():
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= start:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut off by a kill
        write_text_atomic(path, "".join(k + "\n" for k in keep))
    return open(path, "a")


def tensorboard_writer(out: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


class RunLog:
    """`with RunLog(...) as run_log:` add() each step's values (device tensors: no host sync), flush() at log
    points. Every rank reads its values and checks them (the returned losses); only the writer (rank 0)
    has the files and the bar."""

    def __init__(self, out: Path, writer: bool, start: int, stop: int, log_every: int, crops_per_step: int,
                 tensorboard: bool = True):
        self.out, self.log_every, self.crops_per_step = out, log_every, crops_per_step
        self.losses: list[float] = []  # every step's loss since `start`, read at the flushes
        self.pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # (step, lr, loss, grad norm)
        self.started = self.window_started = time.perf_counter()
        self.jsonl = self.tensorboard = self.bar = None
        if writer:
            from tqdm import tqdm
            self.jsonl = open_log(out / LOG, start)
            self.tensorboard = tensorboard_writer(out, tensorboard)
            self.bar = tqdm(total=stop, initial=start, desc="pretrain", unit="step", dynamic_ncols=True,
                            mininterval=1.0)

    def __enter__(self):
        return self

    def add(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.pending.append((step, lr, loss, grad_norm))
        if self.bar is not None:
            self.bar.update(1)

    def flush(self, done: int) -> None:
        """Read the pending values in one device sync; log every log_every-th step and `done`; raise
        NonFiniteLoss at the first loss that is not finite (before any checkpoint of that step is written)."""
        if not self.pending:
            return
        values = torch.stack([torch.stack([loss, grad_norm.float()]) for _, _, loss, grad_norm in self.pending])
        now = time.perf_counter()
        speed = self.crops_per_step * len(self.pending) / (now - self.window_started)
        self.window_started = now
        for (step, lr, _, _), (loss, grad_norm) in zip(self.pending, values.tolist()):
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"the loss became {loss} at step {step}; training stopped. "
                                    f"{last_good(self.out)} Lower --lr, set --clip-grad, or check the data, "
                                    f"then continue with --resume")
            self.losses.append(loss)
            if self.jsonl is not None and (step % self.log_every == 0 or step == done):
                self._write({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                             "crops_per_s": round(speed, 2), "elapsed_s": round(now - self.started, 2)})
        if self.jsonl is not None:
            self.jsonl.flush()
            self.bar.set_postfix(loss=f"{self.losses[-1]:.4f}", lr=f"{self.pending[-1][1]:.2e}",
                                 crops_s=f"{speed:.1f}", refresh=False)
        self.pending.clear()

    def _write(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for tag in SCALARS:
                self.tensorboard.add_scalar(f"pretrain/{tag}", record[tag], record["step"])

    def __exit__(self, *exc):
        for closing in (self.bar, self.jsonl, self.tensorboard):
            try:
                if closing is not None:
                    closing.close()
            except OSError:  # e.g. a full disk: the error that stopped the run is the one to report
                pass
