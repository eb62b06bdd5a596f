"""The pretraining loop: AdamW + warmup/cosine, bf16 on CUDA, DDP through torchrun, atomic checkpoints and
an exact resume (model, optimizer, scheduler, scaler, step, RNG states; the loader restarts at the step).

Read top to bottom, the named steps of `run_pretraining`: resolve the run (options, model config, data,
output folder and its lock, the checkpoint to continue), build model/optimizer/schedule, make the loader,
then the loop (train step, log, checkpoint, preview, stop) and the final checkpoint."""
import json
import os
import sys
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from himae_nnunet.checkpoint.format import (CheckpointError, load_strict, make_meta, remove_stale_temporaries,
                                            save_checkpoint)
from himae_nnunet.core import faults
from himae_nnunet.core.errors import UserError
from himae_nnunet.core.optim import adamw, adamw_param_groups
from himae_nnunet.core.schedule import warmup_decay_factor
from himae_nnunet.models.hiend_mae import HiEndMAE
from himae_nnunet.pretrain.data import CropDataset, StepBatches, find_sources, make_loader
from himae_nnunet.pretrain.options import PretrainOptions, build_config, check_options
from himae_nnunet.pretrain.processes import StopFlag, setup_distributed
from himae_nnunet.pretrain.run_lock import RunLock, RunLocked
from himae_nnunet.pretrain.run_log import NonFiniteLoss, RunLog  # noqa: F401  (NonFiniteLoss: part of this API)
from himae_nnunet.pretrain.run_state import (FINAL, LATEST, LOG, checkpoint_to_resume, check_writable,
                                             elastic_restart_of_this_run, jsonable, last_good, launch_info,
                                             restore_training, rng_state, set_rng_state)

# DDP notes that the patch-embedding grad (C = 1) has another stride on its size-1 axis: same memory layout
warnings.filterwarnings("ignore", message=".*Grad strides do not match bucket view strides.*")

PAPER_CROPS_PER_STEP, PAPER_LR = 192, 1e-4  # 24 volumes x 8 crops per step at lr 1e-4 (Tang et al.)


# ---------------------------------------------------------------- resolve the run

@dataclass
class Run:
    """What one invocation runs: resolved options, model config, data, folder, and this process's place."""
    options: PretrainOptions  # datasets as resolved names, weights as floats, log_every set
    out: Path
    config: dict
    sources: list
    warmup: int
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:  # rank 0 writes the folder
        return self.rank == 0

    @property
    def global_volumes(self) -> int:
        return self.world * self.options.batch_volumes

    @property
    def crops_per_step(self) -> int:
        return self.global_volumes * self.options.crops_per_volume * self.options.accumulate

    @property
    def preview_every(self) -> int:
        return self.options.checkpoint_every if self.options.preview_every is None else self.options.preview_every

    @property
    def data_description(self) -> list[str]:
        return [f"{s.name} ({len(s.identifiers)} cases, {s.plans_name})" for s in self.sources]

    def say(self, *args, **kwargs) -> None:
        if self.main:
            print(*args, **kwargs)

    def from_rank0(self, value):
        """Rank 0's `value` on every rank (a decision only rank 0 can make)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def resolve_run(options: PretrainOptions, rank: int, world: int, device: torch.device) -> Run:
    config = build_config(options)
    sources = find_sources(options.datasets, options.weights, options.plans_name, options.skip_bad_cases)
    # ids, names, ints or strings: store resolved names and float weights so that --resume compares like with like
    options = replace(options, datasets=[s.name for s in sources],
                      weights=[float(w) for w in options.weights] if options.weights else None,
                      log_every=options.log_every or (20 if device.type == "cuda" else 1))
    warmup = min(4000, options.steps // 10) if options.warmup is None else options.warmup
    return Run(options, Path(options.output), config, sources, warmup, rank, world, device)


@contextmanager
def run_folder(run: Run):
    """Create the output folder, hold its lock (rank 0) for the block; a folder this call created is
    removed again if the run leaves nothing in it."""
    created = not run.out.exists()
    check_writable(run.out)
    try:
        with ExitStack() as lock:
            refusal = None
            if run.main:
                try:
                    lock.enter_context(RunLock(run.out, run.say))
                except RunLocked as e:
                    refusal = str(e)
            refusal = run.from_rank0(refusal)
            if refusal:
                raise RunLocked(refusal)
            yield
    finally:
        if created and run.main:
            try:
                run.out.rmdir()  # only succeeds on an empty folder
            except OSError:
                pass


def resume_checkpoint(run: Run) -> dict | None:
    """The checkpoint to continue from (--resume, or torchrun restarting this job), None for a new run;
    then clean up what a killed process left."""
    resume = run.options.resume
    if not resume and run.from_rank0(elastic_restart_of_this_run(run.out) if run.main else False):
        run.say(f"torchrun restart {os.environ.get('TORCHELASTIC_RESTART_COUNT')}: continuing the run in {run.out}")
        resume = True
    ckpt = checkpoint_to_resume(run.out, resume, run.say)
    if run.world > 1:
        dist.barrier()  # every rank checked the folder before rank 0 writes into it
    if run.main:
        for name in remove_stale_temporaries(run.out):
            run.say(f"removed {run.out / name}: a checkpoint write cut off by a killed process (the checkpoint it "
                    f"would have replaced is intact)")
    for source in run.sources:
        for msg in source.skipped:
            run.say(f"skipping bad case {msg}")
    return ckpt


# ---------------------------------------------------------------- build model, optimizer, schedule

@dataclass
class Training:
    """The trained objects. `net` is the DDP wrapper (or the model), `forward` its compiled form (or it)."""
    model: HiEndMAE
    net: torch.nn.Module
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    start: int  # the first step this invocation runs (0-based)


def build_training(run: Run, ckpt: dict | None) -> Training:
    options, device = run.options, run.device
    torch.manual_seed(options.seed)
    model = HiEndMAE(run.config).to(device)
    optimizer = adamw(adamw_param_groups(model, options.weight_decay), device, lr=options.lr,
                      betas=tuple(options.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_decay_factor(
        step, options.steps, run.warmup, base_lr=options.lr, min_lr=options.min_lr))
    amp_dtype = None
    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    start = 0
    if ckpt is not None:
        state = restore_training(ckpt, options, run.global_volumes)
        load_strict(model, ckpt["state_dict"], run.out / LATEST)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start = state["next_step"]
    net = model
    if run.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    forward = torch.compile(net) if options.compile else net
    return Training(model, net, forward, optimizer, scheduler, scaler, amp_dtype, start)


def end_step(run: Run, start: int) -> int:
    """The step this invocation ends at: --steps, or --stop-at before it."""
    stop = min(run.options.steps, run.options.stop_at or run.options.steps)
    if stop <= start:
        raise UserError(f"--stop-at {run.options.stop_at} is not after the run's step {start}")
    return stop


# ---------------------------------------------------------------- make the loader

class MicroBatches:
    """Each step's micro-batches from the loader; with --fixed-batch, step 0's again at every step."""

    def __init__(self, run: Run, start: int, stop: int):
        options = run.options
        dataset = CropDataset(run.sources, run.config["crop_size"], options.crops_per_volume, options.seed,
                              run.config["patch_size"], augment=options.augment,
                              skip_bad_cases=options.skip_bad_cases)
        sampler = StepBatches(start, start + 1 if options.fixed_batch else stop, options.accumulate,
                              options.batch_volumes, run.rank, options.fixed_batch)
        self.loader = iter(make_loader(dataset, sampler, options.workers, pin_memory=run.device.type == "cuda"))
        self.accumulate, self.fixed, self.kept = options.accumulate, options.fixed_batch, []

    def for_step(self):
        """The step's `accumulate` batches, loaded one at a time as the step consumes them."""
        for micro in range(self.accumulate):
            if len(self.kept) == self.accumulate:
                yield self.kept[micro]
                continue
            batch = next(self.loader)
            if self.fixed:
                self.kept.append(batch)
            yield batch


# ---------------------------------------------------------------- train step, checkpoint, preview

def train_step(run: Run, training: Training, batches: MicroBatches, step: int):
    """One optimizer step (0-based `step`) over the micro-batches. Returns (mean loss, grad norm, the last
    micro-batch's (crops, permutations)); loss and norm stay on the device (no host sync inside a step)."""
    options, device = run.options, run.device
    training.net.train()
    training.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for micro, batch in enumerate(batches.for_step()):
        if batch["error"]:
            raise UserError(f"{batch['error']}\nTraining stopped at step {step + 1}. {last_good(run.out)} "
                            f"Continue with the same command plus --resume")
        for msg in batch["skipped"]:
            run.say(f"\nskipped bad case {msg}")
        crops = batch["image"].to(device, non_blocking=True)  # B*crops, 1, H, W, D
        perm = batch["perm"].to(device, non_blocking=True)  # B*crops, N
        sync = training.net.no_sync() if run.world > 1 and micro < options.accumulate - 1 else nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=training.amp_dtype, enabled=training.amp_dtype is not None):
                loss = training.forward(crops, shuffle_indices=perm).loss
            training.scaler.scale(loss / options.accumulate).backward()
        loss_sum += loss.detach().float() / options.accumulate
    if run.world > 1:
        dist.all_reduce(loss_sum)
        loss_sum /= run.world
    training.scaler.unscale_(training.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(training.model.parameters(), options.clip_grad or float("inf"))
    # a non-finite loss is caught at the next flush, which always comes before a checkpoint is written:
    # damaged weights are never saved
    training.scaler.step(training.optimizer)
    training.scaler.update()
    training.scheduler.step()
    return loss_sum, grad_norm, (crops, perm)


def stop_requested(run: Run, signals: StopFlag) -> bool:
    """Whether any rank got SIGINT/SIGTERM (all ranks stop at the same step)."""
    flag = torch.tensor([float(signals.set)], device=run.device)
    if run.world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def write_checkpoint(run: Run, training: Training, name: str, step: int, with_state: bool = True) -> None:
    """Rank 0 writes `name` atomically: weights and meta, plus the full training state for resuming."""
    if not run.main:
        return
    extra = None
    if with_state:
        extra = {"training": {"next_step": step, "optimizer": training.optimizer.state_dict(),
                              "scheduler": training.scheduler.state_dict(),
                              "scaler": training.scaler.state_dict(),
                              "rng": rng_state(), "options": {k: jsonable(v) for k, v in asdict(run.options).items()},
                              "world_size": run.world, "global_volumes": run.global_volumes}}
    meta = make_meta(run.config, step=step, method=run.options.method, spacing=run.sources[0].spacing,
                     window=run.sources[0].window, data=run.data_description)
    try:
        save_checkpoint(run.out / name, training.model.state_dict(), meta, extra)
    except CheckpointError as e:
        raise CheckpointError(f"{e}.\nTraining stopped at step {step}. {last_good(run.out)} Free space (or fix "
                              f"the folder), then continue with the same command plus --resume") from None


def write_preview(run: Run, model: HiEndMAE, inputs: tuple, step: int) -> None:
    from himae_nnunet.pretrain.preview import save_preview
    crops, perm = inputs
    save_preview(model, crops[:1], perm[:1], run.out / "previews" / f"step_{step:07d}.png",
                 f"{run.options.method} step {step}")


# ---------------------------------------------------------------- the loop

def train(run: Run, training: Training, batches: MicroBatches, run_log: RunLog, signals: StopFlag,
          stop: int) -> int:
    """Steps training.start .. stop; returns the step it ended at (earlier after SIGINT/SIGTERM)."""
    options = run.options
    for step in range(training.start, stop):
        lr = training.scheduler.get_last_lr()[0]
        loss, grad_norm, inputs = train_step(run, training, batches, step)
        done = step + 1
        faults.maybe_kill_at_step(done)  # tests only (HIMAE_FAULT_KILL_AT_STEP); a no-op otherwise
        run_log.add(done, lr, loss, grad_norm)
        at_checkpoint = done % options.checkpoint_every == 0 or done == stop
        at_preview = run.main and run.preview_every and (done % run.preview_every == 0 or done == options.steps)
        stopping = False
        if done % options.log_every == 0 or at_checkpoint or at_preview:
            stopping = stop_requested(run, signals)
            run_log.flush(done)
        if at_checkpoint or stopping:
            write_checkpoint(run, training, LATEST, done)
        if at_preview:
            write_preview(run, training.model, inputs, done)
        if stopping:
            return done
    return stop


def announce(run: Run, training: Training, stop: int) -> None:
    """What is trained on what, with which batch and precision; a warning when the batch is not the paper's."""
    options, config = run.options, run.config
    n_params = sum(p.numel() for p in training.model.parameters())
    precision = f"autocast {str(training.amp_dtype).split('.')[-1]}" if training.amp_dtype else "fp32"
    run.say(f"pretraining {options.method} (B={config['stages']}) {options.model}: {n_params / 1e6:.1f}M "
            f"parameters, crop {list(config['crop_size'])}, mask ratio {options.mask_ratio}, {options.pos_embed} "
            f"position embedding; data: {', '.join(run.data_description)}")
    batch = (f"{run.world} process(es) x {options.batch_volumes} volumes x {options.crops_per_volume} crops x "
             f"accumulate {options.accumulate} = {run.crops_per_step} crops/step")
    run.say(f"effective batch: {batch}; device {run.device}, {precision}; steps {training.start} -> {stop} of "
            f"{options.steps} (warmup {run.warmup})")
    if options.lr == PAPER_LR and run.crops_per_step != PAPER_CROPS_PER_STEP:
        scaled = PAPER_LR * run.crops_per_step / PAPER_CROPS_PER_STEP
        run.say(f"warning: the paper's learning rate {PAPER_LR:g} belongs to its global batch of "
                f"{PAPER_CROPS_PER_STEP} crops/step (24 volumes x 8 crops); this run uses lr {options.lr:g} with "
                f"{run.crops_per_step} crops/step ({batch}). The authors' code applies its learning rate "
                f"unchanged at any batch size (no linear scaling), and so does this run; linear scaling would "
                f"give --lr {scaled:.3g}", file=sys.stderr)


def write_run_config(run: Run) -> None:
    options = {k: jsonable(v) for k, v in asdict(run.options).items()}
    (run.out / "config.json").write_text(json.dumps({"options": options, "model": run.config,
                                                     "world_size": run.world, "data": run.data_description,
                                                     "launch": launch_info()}, indent=2, default=list))


def run_pretraining(options: PretrainOptions) -> dict:
    """Run (or continue) a pretraining run. Returns {'step', 'losses', 'output', 'model'}."""
    check_options(options)
    rank, world, device, started = setup_distributed(options.device)
    try:
        return pretrain(resolve_run(options, rank, world, device))
    except OSError as e:  # full disk, vanished or read-only folder, ...: one message, the checkpoint is kept
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise UserError(f"input/output error{where}: {type(e).__name__}: {e.strerror or e}; training stopped. "
                        f"{last_good(Path(options.output))} Free space or fix the folder, then continue with "
                        f"the same command plus --resume") from None
    finally:
        if started:
            dist.destroy_process_group()


def pretrain(run: Run) -> dict:
    """The run's steps, holding its folder: resume point, build, loader, loop, final checkpoint."""
    with run_folder(run):
        training = build_training(run, resume_checkpoint(run))
        stop = end_step(run, training.start)
        batches = MicroBatches(run, training.start, stop)
        announce(run, training, stop)
        if run.main and training.start == 0:
            write_run_config(run)
        run_log = RunLog(run.out, run.main, training.start, stop, run.options.log_every, run.crops_per_step,
                         run.options.tensorboard)
        with StopFlag() as signals, run_log:
            ended = train(run, training, batches, run_log, signals, stop)
            if ended == run.options.steps:
                write_checkpoint(run, training, FINAL, ended, with_state=False)
    if ended == run.options.steps:
        run.say(f"done: {run.out / FINAL} (step {ended}); log {run.out / LOG}")
    else:
        run.say(f"stopped at step {ended} of {run.options.steps}: {run.out / LATEST}; continue with the same "
                f"command plus --resume")
    return {"step": ended, "losses": run_log.losses, "output": str(run.out), "model": training.model}
