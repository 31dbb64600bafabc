"""``realdata`` tier: real work on the real Task04_Hippocampus data (skips when ../shared is absent).

A short MACL pretraining on 8 of the cases (through the few-label protocol's pretraining view), its
weights transferred into ``nnUNetTrainerMACL`` (the benchmark variant, for a CPU-sized batch), and losses
that fall: the pretraining's over its epochs, the fine-tuning's over its epochs. A few minutes on 2 idle
cores (3 pretraining epochs took 15 min with a load of 10).
"""
from __future__ import annotations

import numpy as np
import torch

from nnunetv2_macl.data.slice_dataset import list_cases
from nnunetv2_macl.fewlabel.curves import read_training_logs
from nnunetv2_macl.fewlabel.views import pretrain_view
from nnunetv2_macl.training.checkpoint import load_checkpoint


def test_pretrain_on_a_subset_transfer_and_falling_losses(hippocampus_dataset, monkeypatch, tmp_path):
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2_macl.run.pretrain import run_pretraining
    from nnunetv2_macl.run.trainer_path import ext_trainer_value
    from nnunetv2_macl.training.config import MACLConfig

    data_identifier = hippocampus_dataset["data_folder"].name
    _, cases = list_cases(str(hippocampus_dataset["data_folder"]))
    subset = cases[:8]
    view_root = tmp_path / "pretrain_view"
    pretrain_view(hippocampus_dataset["preprocessed"], view_root, data_identifier, subset)
    monkeypatch.setenv("nnUNet_preprocessed", str(view_root))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    folder = run_pretraining(hippocampus_dataset["id"], "2d", "nnUNetPlans",
                             MACLConfig(epochs=2, batch_size=16, num_workers=0, seed=1, save_every=3), device="cpu")
    ckpt = load_checkpoint(f"{folder}/checkpoint_final.pth")
    total = ckpt["logging"]["total"]
    assert len(total) == 2 and np.all(np.isfinite(total)) and total[-1] < total[0], total

    # fine-tuning on the real preprocessed dataset, starting from those weights
    monkeypatch.setenv("nnUNet_preprocessed", str(hippocampus_dataset["preprocessed"].parent))
    monkeypatch.setenv("nnUNet_extTrainer", ext_trainer_value(None))
    monkeypatch.setenv("MACL_PRETRAINED", f"{folder}/checkpoint_final.pth")
    for var, value in (("MACL_BENCH_EPOCHS", "3"), ("MACL_BENCH_ITERS", "10"), ("MACL_BENCH_VAL_ITERS", "2"),
                       ("MACL_BENCH_BATCH", "16"), ("MACL_BENCH_SEED", "1")):
        monkeypatch.setenv(var, value)
    trainer = get_trainer_from_args(str(hippocampus_dataset["id"]), "2d", 0, "nnUNetTrainerMACL_bench", "nnUNetPlans",
                                    False, device=torch.device("cpu"))
    trainer.run_training()
    report = trainer.macl_transfer_report
    assert report is not None and report.source.endswith("checkpoint_final.pth")
    assert report.encoder_total > 0 and report.encoder_loaded == report.encoder_total
    weights = ckpt["network_weights"]
    assert any(k.startswith("decoder.stages.") for k in report.loaded)     # pretrained decoder stages too
    assert set(report.loaded) <= set(weights)
    epochs = read_training_logs(trainer.output_folder)                       # nnU-Net's own training log
    losses = [epochs[e]["train_loss"] for e in sorted(epochs)]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
