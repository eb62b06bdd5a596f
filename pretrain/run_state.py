"""Run folder state of pretraining: RNG states as plain tensors/lists (checkpoints load with
weights_only=True), the refusal to mix runs, the options a resumed run must keep, torchrun restarts."""
from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from himae_nnunet.checkpoint.format import read_checkpoint
from himae_nnunet.core.errors import UserError

if TYPE_CHECKING:
    from himae_nnunet.pretrain.options import PretrainOptions

LATEST, FINAL, LOG = "checkpoint_latest.pt", "checkpoint_final.pt", "log.jsonl"
# options that define the sample and model sequence: a resumed run must keep them
RUN_DEFINING = ("datasets", "weights", "plans_name", "model", "method", "stages", "mask_ratio", "crop_size",
                "pos_embed", "crops_per_volume", "accumulate", "seed", "fixed_batch", "augment")
# options that only change how the run continues: a resumed run may change them, with a note
CONTINUATION = ("lr", "min_lr", "warmup", "weight_decay", "clip_grad", "steps")


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                      int(np_state[3]), float(np_state[4])],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_state(saved: dict) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] and torch.cuda.is_available() and len(saved["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved["cuda"])
    numpy_state = saved["numpy"]
    np.random.set_state((numpy_state[0], numpy_state[1].numpy().astype(np.uint32), *numpy_state[2:5]))
    random.setstate((saved["python"][0], tuple(saved["python"][1]), saved["python"][2]))


def checkpoint_to_resume(out: Path, resume: bool, say=print) -> dict | None:
    """The checkpoint this invocation continues from, None for a new run; refuses to mix runs."""
    existing = [n for n in (LATEST, FINAL, LOG) if (out / n).exists()]
    if not resume:
        if existing:
            raise UserError(f"{out} already holds a pretraining run ({', '.join(existing)}); add --resume to "
                            f"continue it, or choose another --output")
        return None
    if not (out / LATEST).is_file():
        if (out / LOG).is_file() and not (out / FINAL).exists():  # killed before its first checkpoint
            say(f"note: {out} holds no checkpoint yet (the run stopped before its first one); starting at step 0")
            return None
        raise UserError(f"--resume: {out / LATEST} does not exist; start without --resume")
    return read_checkpoint(out / LATEST)


def check_writable(out: Path) -> None:
    """Create the run folder and write a probe file: a read-only, full or impossible --output fails here,
    before any data is loaded, instead of at the first checkpoint."""
    probe = out / f".write_test.{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"himae-nnunet write test\n")
        probe.unlink()
    except OSError as e:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        raise UserError(f"cannot write into the output folder {out} ({type(e).__name__}: {e.strerror or e}); "
                        f"choose another --output, or free space / fix its permissions") from None


def launch_info() -> dict | None:
    """Who started this process under torchrun: its agent (parent) process, host and run id; None otherwise."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return {"run_id": os.environ["TORCHELASTIC_RUN_ID"], "agent_pid": os.getppid(), "host": socket.gethostname()}


def elastic_restart_of_this_run(out: Path) -> bool:
    """True when torchrun restarted this job (TORCHELASTIC_RESTART_COUNT > 0) and the run folder was started by
    the same torchrun agent (config.json's launch block): then the job continues its own run automatically.
    A folder that held another run before the job started is never continued without --resume."""
    try:
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return False
    if restarts < 1 or not (out / "config.json").is_file():
        return False
    try:
        saved = json.loads((out / "config.json").read_text()).get("launch")
    except (OSError, json.JSONDecodeError):
        return False
    return saved is not None and saved == launch_info()


def restore_training(ckpt: dict, options: PretrainOptions, global_volumes: int) -> dict:
    """The checkpoint's training state, after checking that `options` continue the saved run."""
    state = ckpt.get("training")
    if not isinstance(state, dict):
        raise UserError(f"{options.output}/{LATEST} holds no training state (weights only); start a new run from it "
                        f"is not supported, choose another --output")
    saved = state["options"]
    diff = [k for k in RUN_DEFINING if differs(saved, options, k)]
    if state["global_volumes"] != global_volumes:
        diff.append(f"global batch ({state['global_volumes']} volumes saved, now {global_volumes})")
    if diff:
        raise UserError("--resume with options that differ from the saved run: " + ", ".join(
            f"{k} (saved {saved.get(k)!r})" if k in saved else k for k in diff) + "; use the same values")
    for k in CONTINUATION:
        if differs(saved, options, k):
            print(f"note: --{k.replace('_', '-')} changed from {saved.get(k)} to {getattr(options, k)}; the "
                  f"continuation differs from an uninterrupted run")
    if state["next_step"] >= options.steps:
        raise UserError(f"the run in {options.output} is at step {state['next_step']} already; give a larger --steps")
    return state


def differs(saved: dict, options: PretrainOptions, name: str) -> bool:
    """Whether option `name` differs from the saved run's; an option newer than the run counts as its default."""
    default = type(options).__dataclass_fields__[name].default
    return json.dumps(saved.get(name, jsonable(default))) != json.dumps(jsonable(getattr(options, name)))


def jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def last_good(out: Path) -> str:
    """The sentence for error messages about which checkpoint survives."""
    if (out / LATEST).is_file():
        try:
            step = read_checkpoint(out / LATEST)["meta"]["step"]
            return f"The last good checkpoint, {out / LATEST} (step {step}), is kept."
        except UserError:
            pass
    return "No checkpoint had been written yet."
