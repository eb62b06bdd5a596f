"""The one learning-rate schedule of pretraining and fine-tuning: linear warmup, then cosine (or nnU-Net's
poly) decay. Pretraining counts optimizer steps, fine-tuning counts nnU-Net epochs."""
import math

DECAYS = ("cosine", "poly")


def warmup_decay_factor(step: int, total: int, warmup: int, *, base_lr: float = 1.0, min_lr: float = 0.0,
                        decay: str = "cosine") -> float:
    """Multiplier of base_lr at `step` (0-based): (step + 1) / warmup during the warmup, then from 1 down to
    min_lr / base_lr at `total` along a half cosine (or (1 - t)^0.9 for 'poly'); flat after `total`.

    base_lr and min_lr are absolute rates, not their ratio: the float operations, and with them every logged
    LR, stay bit for bit those of the two formulas this function replaced (with the defaults 1 and 0 the
    factor is exactly the bare cosine or poly shape)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "cosine":  # written as before the merge: the same float operations in the same order
        return (min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / base_lr
    if decay == "poly":
        return (min_lr + (base_lr - min_lr) * (1 - progress) ** 0.9) / base_lr
    raise ValueError(f"decay {decay!r}: use one of {', '.join(DECAYS)}")
