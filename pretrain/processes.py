"""The processes of a pretraining run: torchrun/DDP setup (with a store per elastic attempt) and the
SIGINT/SIGTERM flag (the loop all-reduces it, so every rank stops at the same step)."""
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from himae_nnunet.core.errors import UserError


def setup_distributed(device: str | None):
    """(rank, world size, torch.device, whether we initialised the process group). torchrun sets the env."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: use cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA GPU; use --device cpu or fix the CUDA install")
    dev = torch.device("cuda", local % torch.cuda.device_count()) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(dev)
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", **elastic_store(rank, world))
        started = True
    return rank, world, dev, started


def elastic_store(rank: int, world: int) -> dict:
    """Under torchrun the workers share the agent's TCP store, and it outlives a restart: the process group of
    a restarted attempt would read the dead attempt's addresses under the same keys (gloo: 'Connection
    refused' at init). A prefix per attempt keeps them apart. {} outside torchrun (env:// as usual)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    from datetime import timedelta
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(minutes=10))
    return dict(store=dist.PrefixStore(f"himae_attempt_{attempt}", store), rank=rank, world_size=world)


class StopFlag:
    """SIGINT/SIGTERM (e.g. a cluster's pre-emption) -> finish the step, write the checkpoint, stop."""

    def __init__(self):
        self.set, self.previous_handlers = False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous_handlers[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:  # second signal: stop now
            raise KeyboardInterrupt
        self.set = True
        print(f"\nsignal {signum}: stopping after this step (checkpoint written); continue with --resume",
              file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)
