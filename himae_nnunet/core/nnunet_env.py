"""nnU-Net's folders and dataset names, with one clear message when something is missing."""
import os
from pathlib import Path

from himae_nnunet.core.errors import UserError

FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
CONFIGURATION = "3d_fullres"  # the nnU-Net configuration our plans (pretraining and ViT) define


def require_folder(var: str) -> Path:
    """The folder named by an nnU-Net environment variable; a clear message when unset or absent."""
    value = os.environ.get(var)
    if not value:
        raise UserError(f"the nnU-Net environment variable {var} is not set; set it, e.g. "
                        f"`export {var}=/data/{var}` (all of {', '.join(FOLDERS)} are needed)")
    path = Path(value)
    if not path.is_dir():
        raise UserError(f"{var}={value} is not an existing folder; create it (mkdir -p {value}) or fix the variable")
    return path


def require_free_dataset_id(dataset_id: int, *more_roots: Path) -> None:
    """nnU-Net finds a dataset by its id alone: refuse an id already used in its folders (or in more_roots)."""
    if not 1 <= int(dataset_id) <= 999:
        raise UserError(f"--dataset-id {dataset_id}: nnU-Net dataset ids are 1 to 999")
    roots = [Path(os.environ[var]) for var in FOLDERS if os.environ.get(var)] + [Path(r) for r in more_roots]
    taken = [p.name for root in roots if root.is_dir() for p in root.glob(f"Dataset{int(dataset_id):03d}_*")]
    if taken:
        raise UserError(f"dataset id {dataset_id} is taken ({taken[0]}); choose a free --dataset-id")


def dataset_name(dataset: str | int) -> str:
    """'DatasetXXX_Name' for an id or a name, searched as nnU-Net does (raw, preprocessed, results)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    for var in FOLDERS[:2]:
        require_folder(var)
    try:
        return maybe_convert_to_dataset_name(str(dataset) if not str(dataset).isdigit() else int(dataset))
    except RuntimeError as e:
        raise UserError(f"dataset {dataset!r} was not found in nnUNet_raw, nnUNet_preprocessed or nnUNet_results "
                        f"({str(e).splitlines()[0]}); check the id with `ls $nnUNet_raw`") from None


def dataset_id(name: str) -> int:
    """The id of 'DatasetXXX_Name' (nnU-Net's naming: three digits after 'Dataset')."""
    return int(name[len("Dataset"):len("Dataset") + 3])


def cpu_threads_from_env(device) -> None:
    """On CPU, honour OMP_NUM_THREADS for torch's intra-op threads. nnU-Net's `nnUNetv2_train -device cpu` sets
    them to every core, so runs side by side (e.g. `compare --jobs 2` on 2 cores) oversubscribe the CPU and each
    goes several times slower (measured: 11.5 s per epoch alone, over 75 s per epoch with two at once)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if getattr(device, "type", device) == "cpu" and value.isdigit() and int(value) > 0:
        import torch
        torch.set_num_threads(int(value))
