"""Resuming MACL pretraining (``macl_pretrain ... --c``) after a hard kill continues exactly like an
uninterrupted run, and the data pipeline is a function of (seed, epoch, index) whatever the number
of data-loading workers.

Everything runs on CPU on a small dataset derived from ``tiny_dataset`` (one case of 8 slices, i.e.
2 iterations per epoch at batch 4) with a narrow network (features 8..64 instead of 32..256) so that
each pretraining run takes seconds.

Tolerance of the kill -9 test: the interrupted + resumed run must reproduce the uninterrupted one's
weights within ``RESUME_ATOL`` (max abs difference). All randomness (sampling, crops, augmentation) is
derived from (seed, epoch, index) and model/optimizer/scheduler/RNG states are restored, so on the
same machine the result is bitwise identical (observed difference 0.0); the tolerance only leaves
room for CPU kernels whose reduction order could differ between processes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_macl.run.pretrain import main
from nnunetv2_macl.training.checkpoint import load_checkpoint

RESUME_ATOL = 1e-5
SMALL_FEATURES = [8, 16, 32, 64]


def make_small_dataset(env: dict, tiny: dict, dataset_id: int, slices: int = 8, cases: int = 1) -> dict:
    """A preprocessed dataset (nnU-Net's .npz layout) with ``cases`` cases of the first ``slices`` slices
    of a tiny_dataset case, tiny_dataset's plans with a narrow network; nothing to preprocess."""
    import blosc2

    name = f"Dataset{dataset_id:03d}_Resume{dataset_id}"
    root = Path(env["preprocessed"]) / name
    if root.exists():
        shutil.rmtree(root)
    plans = json.loads(Path(tiny["plans_file"]).read_text())
    plans["dataset_name"] = name
    plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"] = SMALL_FEATURES
    data_folder = root / plans["configurations"]["2d"]["data_identifier"]
    data_folder.mkdir(parents=True)
    (root / "nnUNetPlans.json").write_text(json.dumps(plans))
    shutil.copy(Path(tiny["preprocessed"]) / "dataset.json", root / "dataset.json")
    src = sorted(p for p in Path(tiny["data_folder"]).glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))
    for i in range(cases):
        arr = np.asarray(blosc2.open(urlpath=str(src[i]), mode="r")[:], dtype=np.float32)[:, :slices]
        np.savez(data_folder / f"case_{i:03d}.npz", data=arr)
    out = Path(env["results"]) / name / "MACLPretrainer__nnUNetPlans__2d"
    if out.parent.exists():
        shutil.rmtree(out.parent)
    return {"id": dataset_id, "name": name, "output": out}


def common_args(dataset_id: int, epochs: int) -> list[str]:
    return ["-d", str(dataset_id), "--device", "cpu", "--epochs", str(epochs), "--batch-size", "4",
            "--num-workers", "0", "--decoder-blocks", "1", "--save-every", "1", "--seed", "7"]


def _all_weights(ckpt: dict) -> dict[str, torch.Tensor]:
    out = {"network." + k: v for k, v in ckpt["network_weights"].items()}
    out.update({"heads." + k: v for k, v in ckpt["heads"].items()})
    return out


@pytest.mark.e2e
def test_kill9_then_resume_matches_uninterrupted_run(nnunet_env, tiny_dataset, tmp_path):
    straight = make_small_dataset(nnunet_env, tiny_dataset, 930)
    killed = make_small_dataset(nnunet_env, tiny_dataset, 931)

    # 1. 4 epochs without interruption
    assert main(common_args(930, 4)) == 0
    ref = load_checkpoint(str(straight["output"] / "checkpoint_final.pth"))
    assert ref["macl"]["epoch"] == 4

    # 2. the same run in a real process, SIGKILLed once checkpoint_latest.pth holds epoch 2
    log = open(tmp_path / "killed_run.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "nnunetv2_macl.run.pretrain", *common_args(931, 4)],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    latest = killed["output"] / "checkpoint_latest.pth"
    killed_at, seen = None, None
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if latest.exists() and latest.stat().st_mtime_ns != seen:
                seen = latest.stat().st_mtime_ns
                epoch = load_checkpoint(str(latest))["macl"]["epoch"]  # atomic rename: always complete
                if epoch >= 2:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = epoch
                    break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait()
        log.close()
    assert killed_at is not None, (tmp_path / "killed_run.log").read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL
    # normally 2; on a starved machine the poll may first see epoch 3, which tests the same property
    assert 2 <= killed_at < 4, killed_at
    assert not (killed["output"] / "checkpoint_final.pth").exists()

    # 3. resume for the remaining 2 epochs (a temporary file a kill during a save would leave is removed)
    stale = killed["output"] / ".tmp_checkpoint_latest.pth.killed"
    stale.write_bytes(b"half a checkpoint")
    assert main([*common_args(931, 4), "--c"]) == 0
    assert not stale.exists()
    resumed = load_checkpoint(str(killed["output"] / "checkpoint_final.pth"))
    assert resumed["macl"]["epoch"] == 4

    a, b = _all_weights(ref), _all_weights(resumed)
    assert a.keys() == b.keys()
    max_diff = max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)
    print(f"max abs weight difference, uninterrupted vs killed+resumed: {max_diff:.3g}")
    assert max_diff <= RESUME_ATOL, max_diff
    # the logged losses of the resumed epochs and the learning-rate curve match as well
    for key in ("Lg", "Ld", "LER", "total", "lr"):
        np.testing.assert_allclose(resumed["logging"][key], ref["logging"][key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert resumed["lr_scheduler"]["last_epoch"] == ref["lr_scheduler"]["last_epoch"] == 8
    # momentum buffers too
    for sa, sb in zip(ref["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert float((sa["momentum_buffer"] - sb["momentum_buffer"]).abs().max()) <= RESUME_ATOL

    # the checkpoints are complete, weights_only-loadable resume states; no temporary file remains
    for f in ("checkpoint_latest.pth", "checkpoint_final.pth"):
        ckpt = torch.load(killed["output"] / f, weights_only=True)
        assert {"network_weights", "macl", "heads", "optimizer", "lr_scheduler", "grad_scaler", "rng",
                "logging"} <= set(ckpt)
    # (a kill during a save can leave a .tmp_ file, never a half checkpoint; the resumed run removes it)
    for folder in (straight["output"], killed["output"]):
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp_")]


def test_data_pipeline_is_a_function_of_seed_epoch_index(nnunet_env, tiny_dataset, tmp_path):
    """With persistent worker processes the epoch must still reach the dataset copies in the workers:
    batches of epoch 1 equal those of a single-process loader (and of a loader that starts at epoch 1,
    as a resumed run does), and differ from epoch 0's."""
    from nnunetv2_macl.run.pretrain import load_plans_and_dataset_json
    from nnunetv2_macl.training.config import MACLConfig
    from nnunetv2_macl.training.pretrainer import MACLPretrainer

    ds = make_small_dataset(nnunet_env, tiny_dataset, 932, slices=8, cases=1)
    plans, dataset_json, preprocessed = load_plans_and_dataset_json(ds["name"], "nnUNetPlans")

    def batches(workers: int, epochs: list[int]) -> dict[int, list]:
        # crop 16 < the 32 x 32 slices: random crops, drawn from (seed, epoch, index)
        cfg = MACLConfig(epochs=2, batch_size=4, num_workers=workers, decoder_blocks=0, crop_size=(16, 16), seed=3)
        trainer = MACLPretrainer(plans, "2d", dataset_json, preprocessed, str(tmp_path / "unused"), cfg)
        trainer.initialize()
        out = {}
        for e in epochs:
            trainer.current_epoch = e
            trainer.on_epoch_start()
            out[e] = [(img.clone(), pos.clone()) for img, pos, _ in trainer.dataloader]
        return out

    single = batches(0, [0, 1])
    workers = batches(2, [0, 1])
    resumed = batches(2, [1])
    for e in (0, 1):
        for (ia, pa), (ib, pb) in zip(single[e], workers[e]):
            assert torch.equal(ia, ib) and torch.equal(pa, pb)
    for (ia, pa), (ib, pb) in zip(single[1], resumed[1]):
        assert torch.equal(ia, ib) and torch.equal(pa, pb)
    # different epochs: different order/crops (the workers did not keep epoch 0's dataset state)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(workers[0], workers[1]))
    assert not (tmp_path / "unused").exists()  # building a pretrainer writes nothing
