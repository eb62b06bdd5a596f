"""All benchmarks of one machine in one run, side by side; the last line printed is one JSON summary.

1. model: pretraining crops/s, step time and peak memory per preset, Hi-End-MAE (B = 3) vs MAE (B = 0),
   same encoder and batch, their ratio, and on a GPU the model FLOPs utilisation (model_speed.py);
2. loader: crops/s per worker of our loader vs the authors' MONAI pipeline on the real CTs (loader_speed.py);
3. finetune: training iteration and sliding-window inference per case, our UNETR vs nnU-Net's 3d_fullres
   PlainConvUNet on the same dataset (finetune_speed.py).

    python benchmarks/run.py --quick                      # 2 CPU cores, < 10 min
    python benchmarks/run.py --device cuda --out DIR      # GPU machine (see benchmarks/gpu/run_gpu.sh)

A part whose requirements are missing (real CTs or nnunetv2 for the loader, monai for its MONAI half) is
reported as skipped with the reason; a part that fails is reported with its error and the exit code is 1.
Full results: DIR/benchmark_results.json (default DIR: runs/benchmarks, git-ignored).
"""
import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
ALL_PRESETS = ["vit_tiny", "vit_small", "vit_b16_768", "vit_b16_1536", "vit_b12_1536", "primus_s", "primus_b", "primus_m"]
GPU_INPUTS = HERE / "gpu" / "finetune_inputs.json"  # plans + case shapes of the real CTs, for data-less machines


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in ("torch", "nnunetv2", "monai", "timm", "himae-nnunet"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def machine(device: str) -> dict:
    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_avg_1_5_15": list(os.getloadavg()),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    return info


def part(name: str, results: dict, fn, out: Path):
    """Run one part; keep going on failure (recorded, exit code 1); results so far written after each part."""
    print(f"\n== {name} ==", flush=True)
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # noqa: BLE001 - a benchmark part failing must not hide the others
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {e}"}
    results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark_results.json").write_text(json.dumps(results, indent=1, default=str))


def model_part(args) -> dict:
    import model_speed
    out = {"batch": args.batch, "steps": args.steps, "warmup": args.warmup, "results": []}
    for preset in args.presets:
        r = model_speed.compare(preset, args.batch, args.steps, args.warmup, args.device, False, 96)
        out["results"].append(r)
        print_model(r)
    for preset in args.compile_presets if args.device == "cuda" else []:
        r = model_speed.compare(preset, args.batch, args.steps, args.warmup, args.device, True, 96)
        r["compiled"] = True
        out["results"].append(r)
        print_model(r)
    return out


def label(r: dict) -> str:
    return r["preset"] + ("+compile" if r.get("compiled") else "")


def print_model(r: dict) -> None:
    h, m = r["hiend"], r["mae"]
    extra = f", peak {h['peak_mem_gib']:.1f} / {m['peak_mem_gib']:.1f} GiB" if h["peak_mem_gib"] else ""
    extra += f", MFU {h['mfu']:.1%} / {m['mfu']:.1%}" if "mfu" in h else ""
    print(f"{label(r)}: Hi-End-MAE {h['crops_per_s']:.2f} vs MAE "
          f"{m['crops_per_s']:.2f} crops/s, step time ratio {r['hiend_over_mae_step_time']:.3f}{extra}", flush=True)


def loader_part(args, tmp: Path, state: dict) -> dict:
    import loader_speed
    why = missing_for_loader(args.data)
    if why:
        return {"skipped": why}
    ds, prep_s = loader_speed.prepare(tmp, Path(args.data))
    state["dataset"] = ds
    res = loader_speed.compare(ds, args.loader_rounds, args.loader_volumes, args.monai_volumes)
    res["prepare_s"] = prep_s
    print(f"ours {res['ours_crops_per_s']:.1f} crops/s per worker; MONAI "
          + (f"{res['monai_crops_per_s']:.1f} (x{res['loader_over_monai_crops_per_s']:.2f}); MONAI cached "
             f"{res['monai_cached_crops_per_s']:.1f} (x{res['loader_over_monai_cached_crops_per_s']:.2f})"
             if res.get("monai_crops_per_s") else res["monai_skipped_reason"]), flush=True)
    return res


def missing_for_loader(data: str) -> str | None:
    if not (Path(data) / "README.md").is_file():
        return f"no real CTs at {data} (--data)"
    try:
        import blosc2  # noqa: F401
        import nnunetv2  # noqa: F401
        import SimpleITK  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (the loader reads nnU-Net-preprocessed data)"
    return None


def finetune_part(args, state: dict) -> dict:
    import finetune_speed
    if "dataset" in state:  # the real CTs prepared by the loader part: take plans and shapes from there
        from himae_nnunet.core.nnunet_env import dataset_name
        from himae_nnunet.pretrain.data import find_sources
        pre = Path(os.environ["nnUNet_preprocessed"]) / str(dataset_name(state["dataset"]))
        inputs = finetune_speed.export_inputs(pre, find_sources([state["dataset"]])[0].folder, None)
        source = "real CTs prepared in this run"
    else:
        inputs = json.loads(Path(args.finetune_inputs).read_text())
        source = str(args.finetune_inputs)
    res = finetune_speed.run(inputs, torch.device(args.device), args.unetr_preset, args.quick, args.finetune_steps,
                             args.compile_finetune)
    res["inputs"] = source
    for k, n in res["networks"].items():
        print(f"{k}: train step {n['train_step_s']:.3f} s (batch {n['batch']}, tile {n['tile']}), inference "
              f"{n['infer_case_s']:.2f} s per case {n['case_shape']} ({n['tiles_per_case']} tiles)", flush=True)
    return res


def summary(results: dict, args) -> dict:
    s = {"device": args.device, "quick": args.quick, "date_utc": results["machine"]["date_utc"],
         "load_avg_start": results["machine"]["load_avg_1_5_15"][0], "load_avg_end": os.getloadavg()[0]}
    m = results.get("model", {})
    plain = [r for r in m.get("results", []) if not r.get("compiled")]
    if plain:
        head = plain[-1]  # the largest preset measured
        s["hiend_over_mae_step_time"] = head["hiend_over_mae_step_time"]
        s["headline_preset"] = head["preset"]
        s["hiend_over_mae_step_time_by_preset"] = {r["preset"]: round(r["hiend_over_mae_step_time"], 4)
                                                   for r in m["results"] if not r.get("compiled")}
        s["crops_per_s_hiend_mae"] = {label(r): [round(r["hiend"]["crops_per_s"], 2), round(r["mae"]["crops_per_s"], 2)]
                                      for r in m["results"]}
        if "mfu" in head["hiend"]:
            s["mfu_hiend_mae"] = {label(r): [round(r["hiend"]["mfu"], 4), round(r["mae"]["mfu"], 4)]
                                  for r in m["results"]}
    else:
        s["hiend_over_mae_step_time"] = None
    ld = results.get("loader", {})
    s["loader_over_monai_crops_per_s"] = ld.get("loader_over_monai_crops_per_s")
    s["loader_over_monai_cached_crops_per_s"] = ld.get("loader_over_monai_cached_crops_per_s")
    s["loader_crops_per_s_per_worker"] = {k: ld.get(k) for k in ("ours_crops_per_s", "monai_crops_per_s",
                                                                 "monai_cached_crops_per_s")}
    if "skipped" in ld or "monai_skipped_reason" in ld:
        s["loader_skipped"] = ld.get("skipped") or ld.get("monai_skipped_reason")
    ft = results.get("finetune", {})
    for k in ("unetr_over_nnunet_train_step", "unetr_over_nnunet_infer_case"):
        s[k] = ft.get(k)
    s["errors"] = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    s["results_file"] = str(Path(args.out) / "benchmark_results.json")
    return s


def main(argv=None) -> int:
    """Option declarations, then each part in turn; long because every part has its own sizes."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes for a 2-core CPU (< 10 min)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--parts", nargs="+", default=["loader", "finetune", "model"],
                    choices=["loader", "finetune", "model"])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the real CTs (read-only)")
    ap.add_argument("--out", default=str(REPO / "runs" / "benchmarks"), help="folder for the results file")
    ap.add_argument("--presets", nargs="+", help="model presets (default: all on CUDA; vit_tiny vit_small --quick)")
    ap.add_argument("--compile-presets", nargs="*", default=["vit_b12_1536"], help="also timed with torch.compile "
                                                                                   "(CUDA only)")
    ap.add_argument("--batch", type=int, help="crops per pretraining step (default 64 on CUDA, 2 on CPU)")
    ap.add_argument("--steps", type=int, help="timed steps per model (default 20 on CUDA, 6 on CPU)")
    ap.add_argument("--warmup", type=int, help="untimed steps per model (default 5 on CUDA, 1 on CPU)")
    ap.add_argument("--loader-rounds", type=int, default=3)
    ap.add_argument("--loader-volumes", type=int, default=28, help="volumes per round: ours, MONAI cached")
    ap.add_argument("--monai-volumes", type=int, default=7, help="volumes per round: MONAI (authors' setting)")
    ap.add_argument("--unetr-preset", help="UNETR encoder (default vit_b12_1536; vit_small with --quick)")
    ap.add_argument("--finetune-steps", type=int, help="timed training iterations (default 10; 2 with --quick)")
    ap.add_argument("--finetune-inputs", default=str(GPU_INPUTS),
                    help="plans + case shapes used when the real CTs are not prepared in this run")
    ap.add_argument("--compile-finetune", action="store_true", help="torch.compile both fine-tuning networks")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: 1 when the load average already "
                                                "fills the cores, since oversubscribed OpenMP threads stall "
                                                "each other many times over; else all cores)")
    args = ap.parse_args(argv)
    busy = os.getloadavg()[0] >= (os.cpu_count() or 1) - 0.5
    args.threads = args.threads or (1 if busy else os.cpu_count())
    torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU")
    small = args.quick or not gpu
    args.presets = args.presets or (["vit_tiny", "vit_small", "primus_tiny"] if small else ALL_PRESETS)
    args.batch = args.batch or (2 if small else 64)
    args.steps = args.steps or (6 if small else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 5)
    args.unetr_preset = args.unetr_preset or ("vit_small" if args.quick else "vit_b12_1536")
    args.finetune_steps = args.finetune_steps or (2 if args.quick else 10)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    results = {"machine": machine(args.device), "versions": versions(), "command": " ".join(sys.argv),
               "args": vars(args)}
    print(json.dumps({"machine": results["machine"], "versions": results["versions"]}), flush=True)
    state = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "loader" in args.parts:
            part("loader", results, lambda: loader_part(args, Path(tmp), state), Path(args.out))
        if "finetune" in args.parts:
            part("finetune", results, lambda: finetune_part(args, state), Path(args.out))
        if "model" in args.parts:
            part("model", results, lambda: model_part(args), Path(args.out))
    results["machine"]["load_avg_end"] = list(os.getloadavg())
    s = summary(results, args)
    results["summary"] = s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark_results.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(s), flush=True)
    return 1 if s["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
