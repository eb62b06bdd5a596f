"""The pretraining loop: AdamW + warmup/cosine, bf16 on CUDA, DDP through torchrun, atomic checkpoints and
an exact resume (model, optimizer, scheduler, scaler, step, RNG states; the loader restarts at the step)."""
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from himae_nnunet.core import faults
from himae_nnunet.checkpoint.format import (CheckpointError, load_strict, make_meta, remove_stale_temporaries, save_checkpoint)
from himae_nnunet.core.errors import UserError
from himae_nnunet.models.hiend_mae import HiEndMAE
from himae_nnunet.models.presets import model_config
from himae_nnunet.pretrain.data import CropDataset, StepBatches, find_sources, make_loader
from himae_nnunet.pretrain.run_state import (FINAL, LATEST, LOG, _jsonable, check_output, check_writable, elastic_restart_of_this_run, last_good, launch_info, open_log, restore_training, rng_state, set_rng_state)

# DDP notes that the patch-embedding grad (C = 1) has another stride on its size-1 axis: same memory layout
warnings.filterwarnings("ignore", message=".*Grad strides do not match bucket view strides.*")


@dataclass
class PretrainOptions:
    datasets: list
    output: str
    model: str = "vit_b12_1536"
    method: str = "hiend"  # hiend | mae (= stages 0)
    stages: int | None = None  # dense decoder stages B; default 3 for hiend
    mask_ratio: float = 0.75
    steps: int = 1000  # total optimizer steps of the run
    warmup: int | None = None  # default min(4000, steps // 10)
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    clip_grad: float | None = None
    batch_volumes: int = 2  # volumes per process and micro-batch
    crops_per_volume: int = 8
    crop_size: int = 96
    accumulate: int = 1
    checkpoint_every: int = 500
    preview_every: int | None = None  # default: checkpoint_every; 0 = never
    log_every: int | None = None  # default 1 on CPU, 20 on CUDA (each log point reads the GPU once)
    seed: int = 0
    device: str | None = None  # default cuda when available
    resume: bool = False
    compile: bool = False
    workers: int = 4
    weights: list | None = None
    plans_name: str | None = None
    skip_bad_cases: bool = False
    fixed_batch: bool = False  # the same batch every step (overfitting sanity check)
    augment: bool = True
    stop_at: int | None = None  # end this invocation after that step (checkpoint written); --resume continues
    tensorboard: bool = True


class NonFiniteLoss(UserError):
    pass


def lr_factor(step: int, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    """Multiplier of base_lr for optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return (min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))) / base_lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """Decay on weight matrices only: no decay on biases, norms, cls/mask tokens, position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.split(".")[-1] in ("cls_token", "mask_token", "pos_embed")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def build_config(o: PretrainOptions) -> dict:
    if o.method not in ("hiend", "mae"):
        raise UserError(f"--method {o.method}: use hiend or mae")
    stages = 0 if o.method == "mae" else (3 if o.stages is None else o.stages)
    if o.method == "mae" and o.stages not in (None, 0):
        raise UserError(f"--method mae has no dense stages; drop --stages {o.stages} or use --method hiend")
    if o.method == "hiend" and stages == 0:
        raise UserError("--stages 0 is the MAE baseline; say --method mae")
    return model_config(o.model, stages=stages, mask_ratio=o.mask_ratio, crop_size=o.crop_size)


def check_options(o: PretrainOptions) -> None:
    for name in ("steps", "batch_volumes", "crops_per_volume", "accumulate", "checkpoint_every", "log_every"):
        if getattr(o, name) is not None and getattr(o, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(o, name)}: must be at least 1")
    if o.warmup is not None and o.warmup < 0 or o.lr <= 0 or o.workers < 0:
        raise UserError("--warmup and --workers must be >= 0 and --lr > 0")
    if o.stop_at is not None and o.stop_at < 1:
        raise UserError(f"--stop-at {o.stop_at}: must be a step >= 1")


class StopFlag:
    """SIGINT/SIGTERM (e.g. a cluster's pre-emption) -> finish the step, write the checkpoint, stop."""

    def __init__(self):
        self.set, self.old = False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:  # second signal: stop now
            raise KeyboardInterrupt
        self.set = True
        print(f"\nsignal {signum}: stopping after this step (checkpoint written); continue with --resume",
              file=sys.stderr)

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)


def run_pretraining(o: PretrainOptions) -> dict:
    """Run (or continue) a pretraining run. Returns {'step', 'losses', 'output', 'model'}."""
    check_options(o)
    rank, world, device, started = setup_distributed(o.device)
    try:
        return _train(o, rank, world, device)
    except OSError as e:  # full disk, vanished or read-only folder, ...: one message, the checkpoint is kept
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise UserError(f"input/output error{where}: {type(e).__name__}: {e.strerror or e}; training stopped. "
                        f"{last_good(Path(o.output), rank == 0)} Free space or fix the folder, then continue with "
                        f"the same command plus --resume") from None
    finally:
        if started:
            dist.destroy_process_group()


def _train(o: PretrainOptions, rank: int, world: int, device: torch.device) -> dict:
    out = Path(o.output)
    config = build_config(o)
    warmup = min(4000, o.steps // 10) if o.warmup is None else o.warmup
    sources = find_sources(o.datasets, o.weights, o.plans_name, o.skip_bad_cases)
    # ids, names, ints or strings: store resolved names and float weights so that --resume compares like with like
    o = replace(o, datasets=[s.name for s in sources], weights=[float(w) for w in o.weights] if o.weights else None)
    main = rank == 0
    say = print if main else (lambda *a, **k: None)
    resume = o.resume
    if not resume:  # restarted by torchrun (--max-restarts): continue this job's own run
        auto = [elastic_restart_of_this_run(out) if main else False]
        if world > 1:
            dist.broadcast_object_list(auto, src=0)
        if auto[0]:
            say(f"torchrun restart {os.environ.get('TORCHELASTIC_RESTART_COUNT')}: continuing the run in {out}")
            resume = True
    ckpt = check_output(out, resume, say)
    check_writable(out)
    if world > 1:
        dist.barrier()  # every rank checked the folder before rank 0 writes into it
    if main:
        for name in remove_stale_temporaries(out):
            say(f"removed {out / name}: a checkpoint write cut off by a killed process (the checkpoint it would "
                f"have replaced is intact)")
    for s in sources:
        for msg in s.skipped:
            say(f"skipping bad case {msg}")

    torch.manual_seed(o.seed)
    model = HiEndMAE(config).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, o.steps, warmup, o.lr, o.min_lr))
    amp_dtype = None
    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    start = 0
    global_volumes = world * o.batch_volumes
    if ckpt is not None:
        t = restore_training(ckpt, o, global_volumes)
        load_strict(model, ckpt["state_dict"], out / LATEST)
        optimizer.load_state_dict(t["optimizer"])
        scheduler.load_state_dict(t["scheduler"])
        scaler.load_state_dict(t["scaler"])
        set_rng_state(t["rng"])
        start = t["next_step"]
    stop = min(o.steps, o.stop_at or o.steps)
    if stop <= start:
        raise UserError(f"--stop-at {o.stop_at} is not after the run's step {start}")

    if o.log_every is None:
        o = replace(o, log_every=20 if device.type == "cuda" else 1)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    fwd = torch.compile(net) if o.compile else net
    dataset = CropDataset(sources, config["crop_size"], o.crops_per_volume, o.seed, config["patch_size"],
                          augment=o.augment, skip_bad_cases=o.skip_bad_cases)
    # --fixed-batch: load step 0's micro-batches once and reuse them
    loader = make_loader(dataset, StepBatches(start, start + 1 if o.fixed_batch else stop, o.accumulate,
                                              o.batch_volumes, rank, o.fixed_batch),
                         o.workers, pin_memory=device.type == "cuda")
    crops_per_step = global_volumes * o.crops_per_volume * o.accumulate
    data_desc = [f"{s.name} ({len(s.identifiers)} cases, {s.plans_name})" for s in sources]
    meta_args = dict(method=o.method, spacing=sources[0].spacing, window=sources[0].window, data=data_desc)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"pretraining {o.method} (B={config['stages']}) {o.model}: {n_params / 1e6:.1f}M parameters, crop "
        f"{list(config['crop_size'])}, mask ratio {o.mask_ratio}; data: {', '.join(data_desc)}")
    say(f"effective batch: {world} process(es) x {o.batch_volumes} volumes x {o.crops_per_volume} crops x "
        f"accumulate {o.accumulate} = {crops_per_step} crops/step; device {device}, "
        f"{'autocast ' + str(amp_dtype).split('.')[-1] if amp_dtype else 'fp32'}; steps {start} -> {stop} of "
        f"{o.steps} (warmup {warmup})")

    writer = log = pbar = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        options = {k: _jsonable(v) for k, v in asdict(o).items()}
        if start == 0:
            (out / "config.json").write_text(json.dumps({"options": options, "model": config,
                                                         "world_size": world, "data": data_desc,
                                                         "launch": launch_info()}, indent=2, default=list))
        log = open_log(out / LOG, start)
        writer = tensorboard_writer(out, o.tensorboard)
        from tqdm import tqdm
        pbar = tqdm(total=stop, initial=start, desc="pretrain", unit="step", dynamic_ncols=True, mininterval=1.0)

    def save(path: Path, step: int, with_state: bool):
        if not main:
            return
        extra = None
        if with_state:
            extra = {"training": {"next_step": step, "optimizer": optimizer.state_dict(),
                                  "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                  "rng": rng_state(), "options": {k: _jsonable(v) for k, v in asdict(o).items()},
                                  "world_size": world, "global_volumes": global_volumes}}
        try:
            save_checkpoint(path, model.state_dict(), make_meta(config, step=step, **meta_args), extra)
        except CheckpointError as e:
            raise CheckpointError(f"{e}.\nTraining stopped at step {step}. {last_good(out, main)} Free space (or fix "
                                  f"the folder), then continue with the same command plus --resume") from None

    preview_every = o.checkpoint_every if o.preview_every is None else o.preview_every
    losses, t_start, step = [], time.perf_counter(), start
    batches, fixed = iter(loader), []
    # per-step values stay on the device and are read in one sync at log/checkpoint points, so the host
    # never waits for the GPU inside a step
    pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # (step, lr, loss, grad norm)
    t_window = time.perf_counter()

    def flush(done: int) -> bool:
        """Read the pending steps' values; log them; stop on a non-finite loss. Returns the stop flag."""
        nonlocal t_window
        flag = torch.tensor([float(stop_flag.set)], device=device)
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not pending:
            return bool(flag.item())
        values = torch.stack([torch.stack([lv, gn.float()]) for _, _, lv, gn in pending]).tolist()
        speed = crops_per_step * len(pending) / (time.perf_counter() - t_window)
        t_window = time.perf_counter()
        for (s, lr, _, _), (loss_value, grad_norm) in zip(pending, values):
            if not math.isfinite(loss_value):
                raise NonFiniteLoss(
                    f"the loss became {loss_value} at step {s}; training stopped. {last_good(out, main)} "
                    f"Lower --lr, set --clip-grad, or check the data, then continue with --resume")
            losses.append(loss_value)
            if main and (s % o.log_every == 0 or s == done):
                rec = {"step": s, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                       "crops_per_s": round(speed, 2), "elapsed_s": round(time.perf_counter() - t_start, 2)}
                log.write(json.dumps(rec) + "\n")
                if writer is not None:
                    for k in ("loss", "lr", "grad_norm", "crops_per_s"):
                        writer.add_scalar(f"pretrain/{k}", rec[k], s)
        if main:
            log.flush()
            pbar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{pending[-1][1]:.2e}", crops_s=f"{speed:.1f}",
                             refresh=False)
        pending.clear()
        return bool(flag.item())

    with StopFlag() as stop_flag:
        try:
            for step in range(start, stop):
                net.train()
                optimizer.zero_grad(set_to_none=True)
                lr = scheduler.get_last_lr()[0]
                loss_sum = torch.zeros((), device=device)
                for micro in range(o.accumulate):
                    batch = fixed[micro] if len(fixed) == o.accumulate else next(batches)
                    if o.fixed_batch and len(fixed) < o.accumulate:
                        fixed.append(batch)
                    if batch["error"]:
                        raise UserError(f"{batch['error']}\nTraining stopped at step {step + 1}. "
                                        f"{last_good(out, main)} Continue with the same command plus --resume")
                    for msg in batch["skipped"]:
                        say(f"\nskipped bad case {msg}")
                    x = batch["image"].to(device, non_blocking=True)
                    perm = batch["perm"].to(device, non_blocking=True)
                    sync = net.no_sync() if world > 1 and micro < o.accumulate - 1 else nullcontext()
                    with sync:
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                            loss = fwd(x, shuffle_indices=perm).loss
                        scaler.scale(loss / o.accumulate).backward()
                    loss_sum += loss.detach().float() / o.accumulate
                if world > 1:
                    dist.all_reduce(loss_sum)
                    loss_sum /= world
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad or float("inf"))
                # a non-finite loss is caught at the next flush, which always comes before a checkpoint is
                # written: damaged weights are never saved
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                done = step + 1
                faults.maybe_kill_at_step(done)  # tests only (HIMAE_FAULT_KILL_AT_STEP); a no-op otherwise
                pending.append((done, lr, loss_sum, grad_norm))
                if main:
                    pbar.update(1)
                at_checkpoint = done % o.checkpoint_every == 0 or done == stop
                at_preview = main and preview_every and (done % preview_every == 0 or done == o.steps)
                stopping = False
                if done % o.log_every == 0 or at_checkpoint or at_preview:
                    stopping = flush(done)
                if at_checkpoint or stopping:
                    save(out / LATEST, done, with_state=True)
                if at_preview:
                    from himae_nnunet.pretrain.preview import save_preview
                    save_preview(model, x[:1], perm[:1], out / "previews" / f"step_{done:07d}.png",
                                 f"{o.method} step {done}")
                if stopping:
                    stop = done
                    break
            if stop == o.steps:
                save(out / FINAL, o.steps, with_state=False)
        finally:
            if main:
                for closing in (pbar, log, writer):
                    try:
                        if closing is not None:
                            closing.close()
                    except OSError:  # e.g. a full disk: the error that stopped the run is the one to report
                        pass
    if stop == o.steps:
        say(f"done: {out / FINAL} (step {o.steps}); log {out / LOG}")
    else:
        say(f"stopped at step {stop} of {o.steps}: {out / LATEST}; continue with the same command plus --resume")
    return {"step": stop, "losses": losses, "output": str(out), "model": model}


def tensorboard_writer(out: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))
