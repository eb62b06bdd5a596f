"""Fault injection on the real CTs (vit_tiny, 32^3 crops, CPU, no loader workers): kill -9 at random steps and
in the middle of a checkpoint write, a rank dying under torchrun, full and read-only disks, missing nnU-Net
variables, broken preprocessed files, and checkpoints carrying pickled code on every path that loads one.
Each case: one clear message (exit 2, no traceback) and nothing lost. docs/robustness.md is the table of these.

Faults are injected for real: SIGKILL from outside (os.killpg) or from inside at a fixed point
(himae_nnunet/faults.py, environment variables), a tmpfs mounted small or read-only (we run as root in CI; an
injected ENOSPC stands in where mount is not permitted)."""
import ast
import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from himae_nnunet.checkpoint.format import CheckpointError, read_checkpoint, save_checkpoint
from himae_nnunet.cli import main
from himae_nnunet.core.errors import UserError
from himae_nnunet.pretrain import run_state
from test_pretrain_prepare import tree, write_labelled_dataset  # noqa: F401  (session-prepared nnU-Net tree)
from test_pretrain_loop import CLI_TINY as LOOP_CLI_TINY, ENV1, log_of, strip

REPO = Path(__file__).resolve().parents[1]
CLI_TINY = [*LOOP_CLI_TINY, "--workers", "0"]


def start_cli(args: list, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "himae_nnunet.cli", "pretrain", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=os.environ | ENV1 | (env or {}))


def last_logged(run: Path) -> int:
    try:
        lines = (run / "log.jsonl").read_text().splitlines()
        return max((json.loads(x)["step"] for x in lines if x.endswith("}")), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def no_traceback(text: str) -> bool:
    return "Traceback" not in text


# ---------------------------------------------------------------- kill -9

def test_kill9_five_times_at_random_steps_then_resume_equals_uninterrupted(tree, tmp_path):
    """Five SIGKILLs from outside at seeded random steps (the first before any checkpoint), each followed by
    `--resume`; the final weights and the log equal one uninterrupted run bit for bit."""
    steps, every = 24, 3
    args = [*CLI_TINY, "--steps", str(steps), "--checkpoint-every", str(every), "--seed", "3"]
    run, clean = tmp_path / "killed", tmp_path / "clean"
    rng = random.Random(20261201)
    resumed_from = []
    for i in range(5):
        latest = run / "checkpoint_latest.pt"
        start = read_checkpoint(latest)["meta"]["step"] if latest.exists() else 0
        done = max(start, last_logged(run))  # the log may run ahead of the checkpoint: kill beyond both
        target = rng.randint(1, 2) if i == 0 else rng.randint(done + 1, min(done + 4, steps - 3))
        # backstop: the process kills itself 2 steps later should the poll below be late on a busy machine
        proc = start_cli([*args, "--output", str(run), *(["--resume"] if i else [])],
                         {"HIMAE_FAULT_KILL_AT_STEP": str(target + 2)})
        deadline = time.time() + 120
        while proc.poll() is None and last_logged(run) < target and time.time() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
        assert not (run / "checkpoint_final.pt").exists()
        if i == 0:  # killed before the first checkpoint: --resume starts over instead of refusing
            assert not (run / "checkpoint_latest.pt").exists() and last_logged(run) >= 1
        else:
            assert f"steps {start} -> {steps}" in out, out
            if start == 0:
                assert "holds no checkpoint yet" in out
        resumed_from.append(start)
    proc = start_cli([*args, "--output", str(run), "--resume"])
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    proc = start_cli([*args, "--output", str(clean)])  # uninterrupted, same seed, same thread count
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    print("resumed from steps", resumed_from)
    assert resumed_from[0] == 0 and resumed_from[-1] >= every, resumed_from  # from scratch and from checkpoints
    assert strip(log_of(run)) == strip(log_of(clean)) and [r["step"] for r in log_of(run)] == list(range(1, 25))
    a, b = (torch.load(r / "checkpoint_final.pt", weights_only=True)["state_dict"] for r in (run, clean))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in clean.iterdir())  # no debris


def test_kill9_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one(tree, tmp_path):
    run = tmp_path / "run"
    args = [*CLI_TINY, "--steps", "9", "--checkpoint-every", "3", "--output", str(run)]
    proc = start_cli(args, {"HIMAE_FAULT_KILL_IN_CHECKPOINT_WRITE": "6"})
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    half = list(run.glob(".checkpoint_latest.pt.tmp*"))
    assert len(half) == 1 and half[0].stat().st_size > 1_000_000  # the cut-off temporary file
    with pytest.raises(CheckpointError, match="damaged or not a checkpoint"):
        read_checkpoint(half[0])
    assert read_checkpoint(run / "checkpoint_latest.pt")["meta"]["step"] == 3  # the previous one, intact
    proc = start_cli([*args, "--resume"])
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    assert f"removed {half[0]}" in out and "steps 3 -> 9" in out
    print(out.splitlines()[0])
    assert not list(run.glob(".*tmp*")) and read_checkpoint(run / "checkpoint_final.pt")["meta"]["step"] == 9


def test_sigterm_stops_after_the_step_with_a_checkpoint(tree, tmp_path):
    """A cluster's pre-emption (SIGTERM): the step finishes, a checkpoint is written, exit 0, --resume goes on."""
    run = tmp_path / "run"
    proc = start_cli([*CLI_TINY, "--steps", "400", "--checkpoint-every", "100", "--output", str(run)])
    deadline = time.time() + 120
    while proc.poll() is None and last_logged(run) < 2 and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    print(err.strip().splitlines()[-1] if "signal" in err else "", out.strip().splitlines()[-1])
    stopped = read_checkpoint(run / "checkpoint_latest.pt")["meta"]["step"]
    assert 2 <= stopped < 400 and f"stopped at step {stopped} of 400" in out and "signal 15" in err
    assert last_logged(run) == stopped and not (run / "checkpoint_final.pt").exists()


# ---------------------------------------------------------------- torchrun: a rank dies, the job restarts

def test_rank_death_under_torchrun_restarts_and_finishes(tree, tmp_path):
    run = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "--max-restarts", "1", "-m", "himae_nnunet.cli",
           "pretrain", *CLI_TINY, "--steps", "8", "--checkpoint-every", "2", "--output", str(run)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ | ENV1 | {
        "HIMAE_FAULT_KILL_AT_STEP": "5", "HIMAE_FAULT_RANK": "1"})  # rank 1: SIGKILL after step 5, first attempt
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "exitcode: -9" in res.stderr and "local_rank: 1" in res.stderr  # the death torchrun saw
    assert "torchrun restart 1: continuing the run in" in res.stdout
    assert "steps 0 -> 8" in res.stdout and "steps 4 -> 8" in res.stdout  # resumed from the step-4 checkpoint
    assert [r["step"] for r in log_of(run)] == list(range(1, 9))  # step 5 of the dead attempt is not logged twice
    assert all(0 < r["loss"] < 2 for r in log_of(run))
    final = read_checkpoint(run / "checkpoint_final.pt")
    assert final["meta"]["step"] == 8 and json.loads((run / "config.json").read_text())["world_size"] == 2


def test_a_restarted_job_continues_only_its_own_run(tmp_path, monkeypatch):
    """torchrun's restart continues the folder its own first attempt started; a folder holding another run
    (from before this job) is still refused without --resume."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job1")
    (tmp_path / "config.json").write_text(json.dumps({"launch": run_state.launch_info()}))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert not run_state.elastic_restart_of_this_run(tmp_path)  # the first attempt never auto-resumes
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert run_state.elastic_restart_of_this_run(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job2")  # another torchrun job, same folder
    assert not run_state.elastic_restart_of_this_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"launch": None}))  # started without torchrun
    assert not run_state.elastic_restart_of_this_run(tmp_path)


# ---------------------------------------------------------------- two runs, one folder

def test_a_second_process_on_the_same_output_is_refused_and_a_killed_runs_lock_taken_over(tree, tmp_path):
    """Two real processes: while the first writes the run, a second one (here with --resume, which would
    otherwise continue from the first's checkpoints) stops with a message naming the first. kill -9 leaves
    the lock file; the next run takes it over, says whose it was, and deletes it at the end."""
    run = tmp_path / "run"
    lock = run / ".pretrain.lock"
    args = [*CLI_TINY, "--steps", "400", "--checkpoint-every", "2", "--output", str(run)]
    first = start_cli(args)
    deadline = time.time() + 120
    while first.poll() is None and last_logged(run) < 3 and time.time() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, first.communicate()[1][-2000:]
    second = start_cli([*args, "--resume"])
    _, err = second.communicate(timeout=240)
    print(err.strip().splitlines()[-1])
    assert second.returncode == 2 and no_traceback(err), err[-2000:]
    assert (f"{run} is being written by another pretraining process, pid {first.pid} on {socket.gethostname()}, "
            f"started ") in err and "choose another --output" in err
    assert first.poll() is None  # the first run goes on
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert json.loads(lock.read_text())["pid"] == first.pid  # kill -9: the file stays, the kernel's lock is gone
    saved = read_checkpoint(run / "checkpoint_latest.pt")["meta"]["step"]
    third = start_cli([*args, "--resume", "--stop-at", str(saved + 1)])
    out, err = third.communicate(timeout=240)
    assert third.returncode == 0, err[-2000:]
    print(out.strip().splitlines()[0])
    assert f"note: taking over the lock {lock} left by pid {first.pid} on {socket.gethostname()}" in out
    assert "which no longer runs (killed or crashed)" in out and f"steps {saved} -> {saved + 1} of 400" in out
    assert not lock.exists() and [r["step"] for r in log_of(run)] == list(range(1, saved + 2))


def test_a_torchrun_restart_takes_over_its_own_jobs_lock_quietly(tmp_path, monkeypatch):
    """An elastic restart finds the lock file of its job's killed first attempt: no note (rank death under
    torchrun, end to end: test_rank_death_under_torchrun_restarts_and_finishes). Another job's is noted."""
    from himae_nnunet.pretrain.run_lock import LOCK, RunLock, holder_info, read_holder
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job1")
    left = holder_info() | {"pid": int(ended.stdout)}  # what the killed first attempt's rank 0 wrote
    notes = []
    for job in ("job1", "job2"):
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
        (tmp_path / LOCK).write_text(json.dumps(left))
        with RunLock(tmp_path, notes.append) as held:
            assert read_holder(held.fd)["launch"]["run_id"] == job and read_holder(held.fd)["pid"] == os.getpid()
        assert not (tmp_path / LOCK).exists()
    assert len(notes) == 1 and f"pid {left['pid']} on" in notes[0] and "(torchrun job job1, agent pid" in notes[0]


# ---------------------------------------------------------------- disks: full, read-only, impossible

def mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_at_a_checkpoint_keeps_the_previous_one(tree, tmp_path, capsys, monkeypatch):
    """A 40 MB filesystem holds one 26 MB training checkpoint but not the temporary copy of the next one."""
    disk = tmp_path / "disk"
    mounted = mount_tmpfs(disk, "size=40m")
    if not mounted:  # no mount permission: the write fails the same way, injected
        import himae_nnunet.checkpoint.format as ck
        real_save, calls = ck.torch.save, []

        def full_save(obj, f, *a, **k):
            calls.append(1)
            if len(calls) > 1:
                f.write(b"\0" * 4096)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, f, *a, **k)
        monkeypatch.setattr(ck.torch, "save", full_save)
    try:
        run = disk / "run"
        args = ["pretrain", *CLI_TINY, "--steps", "6", "--checkpoint-every", "3"]
        assert main([*args, "--output", str(run)]) == 2
        err = capsys.readouterr().err
        print(err)
        assert f"cannot write the checkpoint {run / 'checkpoint_latest.pt'}" in err
        assert "the previous checkpoint_latest.pt is kept unchanged" in err and "(step 3), is kept" in err
        assert "--resume" in err and no_traceback(err)
        assert sorted(p.name for p in run.iterdir()) == ["checkpoint_latest.pt", "config.json", "log.jsonl"]
        assert read_checkpoint(run / "checkpoint_latest.pt")["meta"]["step"] == 3
        # nothing lost: on a disk with room, --resume finishes the run from step 3
        moved = tmp_path / "moved"
        shutil.copytree(run, moved)
        if not mounted:
            monkeypatch.undo()
        assert main([*args, "--output", str(moved), "--resume"]) == 0
        assert "steps 3 -> 6" in capsys.readouterr().out
        assert [r["step"] for r in log_of(moved)] == [1, 2, 3, 4, 5, 6]
        if mounted:  # a disk that is full from the start: refused before any data is loaded
            shutil.rmtree(run)
            with open(disk / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 20))
                except OSError:
                    pass
            assert main([*args, "--output", str(disk / "run2")]) == 2
            err = capsys.readouterr().err
            print(err)
            assert "cannot write into the output folder" in err and "No space left on device" in err
            assert not list((disk / "run2").iterdir())
    finally:
        if mounted:
            umount(disk)


def test_unwritable_output_is_refused_before_training(tree, tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("not a folder")
    args = ["pretrain", *CLI_TINY, "--steps", "2"]
    assert main([*args, "--output", str(afile / "run")]) == 2
    err = capsys.readouterr().err
    print(err)
    assert f"cannot write into the output folder {afile / 'run'} (NotADirectoryError" in err
    assert afile.read_text() == "not a folder"
    ro = tmp_path / "ro"
    if not mount_tmpfs(ro, "ro,size=1m"):
        pytest.skip("mount not permitted: the read-only case needs a read-only filesystem (root ignores chmod)")
    try:
        assert main([*args, "--output", str(ro / "run")]) == 2
        err = capsys.readouterr().err
        print(err)
        assert "cannot write into the output folder" in err and "Read-only file system" in err
    finally:
        umount(ro)


def test_missing_or_wrong_nnunet_variables(tree, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    monkeypatch.delenv("nnUNet_preprocessed")
    assert main(["pretrain", *CLI_TINY, "--steps", "2", "--output", str(run)]) == 2
    err = capsys.readouterr().err
    print(err)
    assert "nnU-Net environment variable nnUNet_preprocessed is not set" in err and "export" in err
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nowhere"))
    assert main(["pretrain", *CLI_TINY, "--steps", "2", "--output", str(run)]) == 2
    err = capsys.readouterr().err
    print(err)
    assert f"nnUNet_preprocessed={tmp_path / 'nowhere'} is not an existing folder" in err
    monkeypatch.delenv("nnUNet_raw")
    assert main(["import-scans", "-i", str(tmp_path), "--dataset-id", "700", "--name", "X"]) == 2
    assert "nnUNet_raw is not set" in capsys.readouterr().err
    assert main(["plan", "501", "--checkpoint", str(tmp_path / "x.pt")]) == 2
    assert "is not set" in capsys.readouterr().err
    assert not run.exists()


# ---------------------------------------------------------------- broken input files

def test_corrupted_properties_and_missing_array_are_named(tree, nnunet_dirs, tmp_path, capsys):
    """The .pkl beside a case cut to garbage, and a case whose .b2nd is gone (truncated .b2nd:
    test_pretrain_loop.test_corrupted_case_is_named_or_skipped)."""
    src = tree["root"] / "nnUNet_preprocessed" / "Dataset501_Unlabelled"
    dst = nnunet_dirs["nnUNet_preprocessed"] / src.name
    shutil.copytree(src, dst)
    folder = dst / "nnUNetPlans_himaePretrain_3d_fullres_zlin"
    args = ["pretrain", *CLI_TINY, "--steps", "2"]
    (folder / "patientB.pkl").write_bytes(b"\x80\x04garbage")
    assert main([*args, "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    print(err)
    assert "patientB" in err and "--skip-bad-cases" in err and not (tmp_path / "a").exists()
    (folder / "notes.txt").write_text("a stray file")
    assert main([*args, "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    print(err)
    assert "holds files of several kinds (.b2nd, .txt)" in err and not (tmp_path / "a").exists()
    (folder / "notes.txt").unlink()
    (folder / "lung.b2nd").unlink()
    (folder / "patientB.pkl").rename(tmp_path / "patientB.pkl")
    assert main([*args, "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    print(err)
    assert "lung.*: the image array of this case is missing" in err and not (tmp_path / "a").exists()
    (tmp_path / "patientB.pkl").rename(folder / "patientB.pkl")
    assert main([*args, "--output", str(tmp_path / "b"), "--skip-bad-cases"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "skipping bad case" in out and "patientB" in out and "lung" in out
    assert "1 cases" in (tmp_path / "b" / "config.json").read_text()  # lung and patientB left out


def test_a_case_that_breaks_during_the_run_stops_with_the_checkpoint_kept(tree, tmp_path, monkeypatch, capsys):
    from himae_nnunet.pretrain.data import CropDataset
    real = CropDataset.load_volume
    calls = []

    def flaky(self, si, cid):  # every case reads fine at start; from the 5th load on, one case fails
        calls.append(cid)
        if len(calls) > 4:
            raise OSError(errno.EIO, "Input/output error")
        return real(self, si, cid)
    monkeypatch.setattr(CropDataset, "load_volume", flaky)
    run = tmp_path / "run"
    assert main(["pretrain", *CLI_TINY, "--steps", "8", "--checkpoint-every", "2", "--output", str(run)]) == 2
    err = capsys.readouterr().err
    print(err)
    assert "cannot read" in err and "Dataset501_Unlabelled" in err and "Input/output error" in err
    assert "Training stopped at step 5" in err and "(step 4), is kept" in err and "--resume" in err
    assert read_checkpoint(run / "checkpoint_latest.pt")["meta"]["step"] == 4


def test_truncated_raw_image_in_prepare_pretrain(nnunet_dirs, capsys):
    """import-scans' bad scans (truncated, 2D, 4D, NaN, zero spacing): test_pretrain_prepare."""
    write_labelled_dataset(nnunet_dirs["nnUNet_raw"])
    img = nnunet_dirs["nnUNet_raw"] / "Dataset502_Labelled" / "imagesTr" / "spleen_0000.nii.gz"
    img.write_bytes(img.read_bytes()[:5000])
    assert main(["prepare-pretrain", "--dataset", "502"]) == 2
    err = capsys.readouterr().err
    print(err)
    assert str(img) in err and no_traceback(err)
    assert list(nnunet_dirs["nnUNet_preprocessed"].iterdir()) == []


# ---------------------------------------------------------------- checkpoints carrying pickled code

class Evil:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_code_is_refused_on_every_loading_path(tree, tmp_path, monkeypatch, capsys, data_dir):
    from himae_nnunet import load_checkpoint
    from himae_nnunet.trainers.finetune import nnUNetTrainerHiEndMAE
    from himae_nnunet.vit_plans.weights import read_pretrained
    from test_plan import tiny_checkpoint
    from test_trainers import vit_plans

    marker = tmp_path / "code_ran"
    ours = tmp_path / "ours_evil.pt"  # our format, code in the meta
    torch.save({"format": "himae-nnunet", "format_version": 1, "state_dict": {}, "meta": Evil(marker)}, ours)
    authors = tmp_path / "authors_evil.pth"  # the authors' layout, code beside the weights
    torch.save({"state_dict": {"encoder_pos_embed": torch.zeros(1, 8, 6)}, "args": Evil(marker)}, authors)
    refused = "refused to load"

    def refuses(argv, path):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert refused in err and str(path) in err and no_traceback(err), err
        assert "it asks for posix.system" in err and "weights_only" not in err  # no advice to load it unsafely
        return err

    for path in (ours, authors):
        with pytest.raises(CheckpointError, match=refused):
            read_checkpoint(path)
        with pytest.raises(CheckpointError, match=refused):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match=refused):
            read_pretrained(path)
        print(refuses(["import-official", str(path), str(tmp_path / "imported.pt")], path))
        refuses(["plan", "501", "--checkpoint", str(path), "--plans-name", "EvilPlans"], path)
        refuses(["analyze", "rank", str(path), "--image", str(data_dir / "ct_pulmonary" / "ct_cropped.nii.gz"),
                 "--output", str(tmp_path / "analysis"), "--device", "cpu"], path)
    assert not (tmp_path / "imported.pt").exists()
    assert not (tree["root"] / "nnUNet_preprocessed" / "Dataset501_Unlabelled" / "EvilPlans.json").exists()

    # the trainer: plans naming a file that was swapped for a malicious one with its sha256 updated by hand
    good, meta = tiny_checkpoint(tmp_path / "tiny.pt")
    plans = vit_plans(good, meta)
    from himae_nnunet.checkpoint.format import sha256
    plans["himae"].update(checkpoint=str(ours), checkpoint_sha256=sha256(ours))
    with pytest.raises(CheckpointError, match=refused):
        nnUNetTrainerHiEndMAE.check_checkpoint(plans, "3d_fullres")
    # export-pretrained with a malicious --checkpoint
    folder = tmp_path / "pre" / "Dataset900_X"
    folder.mkdir(parents=True)
    (folder / "P.json").write_text(json.dumps(vit_plans(good, meta)))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                                                     "a": 1}, "file_ending": ".nii.gz", "numTraining": 1}))
    refuses(["export-pretrained", "--plans", str(folder / "P.json"), "--checkpoint", str(ours), "-o",
             str(tmp_path / "full.pth")], ours)
    assert not (tmp_path / "full.pth").exists()
    # what export-pretrained writes is plain data: it loads with weights_only=True
    assert main(["export-pretrained", "--plans", str(folder / "P.json"), "-o", str(tmp_path / "full.pth")]) == 0
    exported = torch.load(tmp_path / "full.pth", weights_only=True)
    assert exported["network_weights"] and exported["himae"]["sha256"] == sha256(good)
    # pretrain --resume with a swapped checkpoint_latest.pt
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ours, run / "checkpoint_latest.pt")
    refuses(["pretrain", *CLI_TINY, "--steps", "2", "--output", str(run), "--resume"], run / "checkpoint_latest.pt")
    assert not marker.exists()
    # the files really carry code: the unsafe loader runs it
    torch.load(ours, weights_only=False)
    assert marker.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    """An AST scan of the package source: torch.load only with weights_only=True; no pickle.load(s),
    no numpy allow_pickle=True."""
    offenders, loads = [], 0
    for folder in ("himae_nnunet", "pretrain", "trainers"):
        for f in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                    continue
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
                kw = {k.arg: k.value for k in node.keywords}
                where = f"{f.relative_to(REPO)}:{node.lineno}"
                if owner == "torch" and node.func.attr == "load":
                    loads += 1
                    w = kw.get("weights_only")
                    if not (isinstance(w, ast.Constant) and w.value is True):
                        offenders.append(f"{where} torch.load without weights_only=True")
                elif owner in ("pickle", "dill", "cloudpickle") and node.func.attr in ("load", "loads"):
                    offenders.append(f"{where} {owner}.{node.func.attr}")
                elif node.func.attr == "load" and isinstance(kw.get("allow_pickle"), ast.Constant) \
                        and kw["allow_pickle"].value:
                    offenders.append(f"{where} np.load(allow_pickle=True)")
    assert loads >= 1 and not offenders, offenders


def test_export_pretrained_into_an_impossible_folder_gives_a_message(tmp_path, nnunet_dirs, capsys):
    from test_plan import tiny_checkpoint
    from test_trainers import vit_plans
    good, meta = tiny_checkpoint(tmp_path / "tiny.pt")
    folder = nnunet_dirs["nnUNet_preprocessed"] / "Dataset900_X"
    folder.mkdir()
    (folder / "P.json").write_text(json.dumps(vit_plans(good, meta)))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                                                     "a": 1}, "file_ending": ".nii.gz", "numTraining": 1}))
    (tmp_path / "a_file").write_text("x")
    assert main(["export-pretrained", "--plans", str(folder / "P.json"), "-o", str(tmp_path / "a_file" / "x.pth")]) == 2
    assert "a_file" in capsys.readouterr().err
