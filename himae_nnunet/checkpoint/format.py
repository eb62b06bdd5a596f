"""Our checkpoint format: atomic saving, safe loading, metadata.

A checkpoint is a plain dict that `torch.load(path, weights_only=True)` reads:
    {"format": "himae-nnunet", "format_version": 1, "state_dict": {name: tensor}, "meta": {...}}
`meta` holds only str/int/float/bool/list/dict/None: the full model config, the encoder kind ("vit" or
"primus"; older files without it are ViTs), crop size, spacing, intensity window, method, stages, mask ratio,
step, data used, package version.
"""
import hashlib
import io
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from himae_nnunet.core import faults
from himae_nnunet.core.atomic import TMP_PREFIX, temporary_beside
from himae_nnunet.core.errors import UserError
from himae_nnunet.core.version import __version__
from himae_nnunet.core.ct import DEFAULT_SPACING, DEFAULT_WINDOW
from himae_nnunet.models.hiend_mae import HiEndMAE

FORMAT = "himae-nnunet"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


TORCH_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
FOREIGN_MAGIC = ((b"\x1f\x8b", "a gzip-compressed file (a .nii.gz image?)"),
                 (b"\x5c\x01\x00\x00", "a NIfTI-1 image"), (b"\x00\x00\x01\x5c", "a NIfTI-1 image"),
                 (b"\x1c\x02\x00\x00", "a NIfTI-2 image"), (b"\x89HDF", "an HDF5 file"),
                 (b"\x93NUMPY", "a NumPy .npy array"), (b"<", "a text/XML file"), (b"{", "a JSON/text file"))


def torch_file_kind(path: Path) -> str | None:
    """'zip' or 'pickle' for the two layouts torch.save writes; None when the first bytes are neither."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head == TORCH_ZIP_MAGIC[:2]:
        return "zip"
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2-5 (legacy torch.save)
        return "pickle"
    return None


def describe_foreign(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(132)
    if not head:
        return "the file is empty"
    if head[128:132] == b"DICM":
        return "it looks like a DICOM file"
    what = next((name for magic, name in FOREIGN_MAGIC if head.startswith(magic)), None)
    return f"it looks like {what}" if what else f"its first bytes ({head[:8].hex(' ')}) are not a torch file's"


def damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"cannot read {path} as a torch checkpoint ({why}); the file is damaged or not a "
                           f"checkpoint: copy it again or use another one")


def safe_torch_load(path: str | os.PathLike):
    """torch.load with weights_only=True and one clear message for each way it can fail: missing, not a torch
    file at all (random bytes, an image renamed .pt), damaged, or carrying pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    kind = torch_file_kind(path)
    if kind is None:
        raise damaged(path, f"not a torch file: {describe_foreign(path)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]*\w)", str(e))
        if m is None and kind != "zip":  # a pickle header followed by garbage: damaged, not hostile
            raise damaged(path, "UnpicklingError: the data after the header is not a pickle") from None
        # name what the file asks for; not torch's own advice to retry with weights_only=False (that runs it)
        raise CheckpointError(
            f"refused to load {path}: it contains pickled Python objects other than tensors and plain data, "
            f"which could run code ({'it asks for ' + m.group(1) if m else 'not plain data'}); nothing in it was "
            f"run. Only load files from sources you trust; re-save the weights as a plain state dict.") from None
    except Exception as e:  # truncated zip, cut-off pickle, ...
        raise damaged(path, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}") from None


def package_version() -> str:
    return __version__


def make_meta(config: dict, *, method: str | None = None, step: int = 0, spacing=DEFAULT_SPACING,
              window=DEFAULT_WINDOW, data=(), source: str = "himae-nnunet pretrain") -> dict:
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    return dict(
        preset=config.get("preset"),
        encoder=config.get("encoder", "vit"),
        model=config,
        method=method or ("hiend" if config["stages"] > 0 else "mae"),
        stages=config["stages"],
        mask_ratio=config["mask_ratio"],
        crop_size=list(config["crop_size"]),
        patch_size=config["patch_size"],
        spacing=[float(s) for s in spacing],
        intensity_window=[float(w) for w in window],
        step=int(step),
        data=list(data),
        source=source,
        package_version=package_version(),
    )


def save_checkpoint(path: str | os.PathLike, state_dict: dict, meta: dict, extra: dict | None = None) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION,
               "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, "meta": meta}
    if extra:
        payload.update(extra)
    atomic_torch_save(path, payload, step=meta.get("step"))


def atomic_torch_save(path: str | os.PathLike, payload: dict, what: str = "checkpoint", step=None) -> None:
    """torch.save through a temporary file in the same folder, fsync, rename: `path` is whole or untouched."""
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise CheckpointError(f"cannot write the {what} {path}: {path.parent} is a file, not a folder; "
                              f"choose another output path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the folder {path.parent} for the {what} ({e.strerror}); "
                              f"choose another output path") from None
    tmp = temporary_beside(path)  # not `replacing`: a failed write here needs the message below, and fsync
    try:
        with open(tmp, "wb") as f:
            if faults.kill_in_checkpoint_write(step):  # tests: kill -9 with half the file written
                buf = io.BytesIO()
                torch.save(payload, buf)
                f.write(buf.getbuffer()[:buf.tell() // 2])
                f.flush()
                os.fsync(f.fileno())
                faults.die()
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # full disk, read-only or vanished folder; torch's zip writer says RuntimeError
        kept = (f"the previous {path.name} is kept unchanged" if path.is_file() else
                f"no {path.name} was written")
        raise CheckpointError(f"cannot write the {what} {path} ({write_error_reason(e, path.parent)}); "
                              f"{kept} and no partial file is left") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def write_error_reason(e: Exception, folder: Path) -> str:
    """One line for a failed write: the OS reason, or (torch hides it in a RuntimeError) the free space."""
    if isinstance(e, OSError) and e.strerror:
        return f"{type(e).__name__}: {e.strerror}"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < (1 << 20):
        return f"no space left on device: {free} bytes free in {folder}"
    return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else 'no detail'}"


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Delete temporary checkpoint files left by a process killed while writing (kill -9, power loss)."""
    removed = []
    for f in Path(folder).glob(f"{TMP_PREFIX}*.pt.tmp*"):  # what core.atomic.temporary_beside names
        try:
            f.unlink()
            removed.append(f.name)
        except OSError:
            pass
    return removed


def is_ours(ckpt) -> bool:
    return isinstance(ckpt, dict) and ckpt.get("format") == FORMAT


def require_readable_version(ckpt: dict, path) -> dict:
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer himae-nnunet (format {ckpt['format_version']}); "
                              f"upgrade the package")
    return ckpt


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint dict, after checking it is ours; authors' files get a hint to import them first."""
    ckpt = safe_torch_load(path)
    if not is_ours(ckpt):
        hint = ""
        if isinstance(ckpt, dict) and any("encoder.blocks" in k for k in (ckpt.get("state_dict") or ckpt)):
            hint = f" It looks like the authors' format: run `himae-nnunet import-official {path} OUT.pt` first."
        raise CheckpointError(f"{path} is not a himae-nnunet checkpoint.{hint}")
    return require_readable_version(ckpt, path)


def load_checkpoint(path: str | os.PathLike, device="cpu") -> HiEndMAE:
    """The pretraining model of a checkpoint, weights loaded strictly, in eval mode."""
    ckpt = read_checkpoint(path)
    model = HiEndMAE(ckpt["meta"]["model"])
    load_strict(model, ckpt["state_dict"], path)
    model.meta = ckpt["meta"]
    return model.to(device).eval()


def load_strict(model: torch.nn.Module, state_dict: dict, source) -> None:
    """load_state_dict that lists every missing, unexpected and mis-shaped key instead of loading partly."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shaped = sorted(f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shaped:
        lines = [f"{source} does not fit the model ({type(model).__name__}); nothing was loaded."]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else ""))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)
