"""The options of `himae-nnunet pretrain` (one dataclass, the CLI fills it) and their checks."""
from dataclasses import dataclass

from himae_nnunet.core.errors import UserError
from himae_nnunet.models.presets import PRESETS, model_config


@dataclass
class PretrainOptions:
    datasets: list
    output: str
    model: str = "vit_b12_1536"
    encoder: str | None = None  # "vit" | "primus"; None: the preset's (given, it must agree with it)
    method: str = "hiend"  # hiend | mae (= stages 0)
    stages: int | None = None  # dense decoder stages B; default 3 for hiend
    mask_ratio: float = 0.75
    pos_embed: str | None = None  # sincos (fixed) | learnable (the authors' 'perceptron': normal, std 0.02);
    # None: the preset's (sin-cos for the ViTs, learnable for Primus), resolved at construction
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

    def __post_init__(self):
        if self.pos_embed is None and self.model in PRESETS:
            self.pos_embed = PRESETS[self.model].get("pos_embed", "sincos")


def build_config(options: PretrainOptions) -> dict:
    if options.method not in ("hiend", "mae"):
        raise UserError(f"--method {options.method}: use hiend or mae")
    stages = 0 if options.method == "mae" else (3 if options.stages is None else options.stages)
    if options.method == "mae" and options.stages not in (None, 0):
        raise UserError(f"--method mae has no dense stages; drop --stages {options.stages} or use --method hiend")
    if options.method == "hiend" and stages == 0:
        raise UserError("--stages 0 is the MAE baseline; say --method mae")
    if options.encoder is not None and options.encoder != PRESETS[options.model].get("encoder", "vit"):
        kind = PRESETS[options.model].get("encoder", "vit")
        raise UserError(f"--encoder {options.encoder} does not match --model {options.model} (a {kind} preset); "
                        f"choose a {options.encoder}_* preset: "
                        f"{', '.join(n for n, c in PRESETS.items() if c.get('encoder', 'vit') == options.encoder)}")
    return model_config(options.model, stages=stages, mask_ratio=options.mask_ratio, crop_size=options.crop_size,
                        pos_embed=options.pos_embed)


def check_options(options: PretrainOptions) -> None:
    for name in ("steps", "batch_volumes", "crops_per_volume", "accumulate", "checkpoint_every", "log_every"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(options, name)}: must be at least 1")
    if options.warmup is not None and options.warmup < 0 or options.lr <= 0 or options.workers < 0:
        raise UserError("--warmup and --workers must be >= 0 and --lr > 0")
    if options.stop_at is not None and options.stop_at < 1:
        raise UserError(f"--stop-at {options.stop_at}: must be a step >= 1")
