"""``macl_diagnose``: is a MACL pretraining checkpoint's image-level embedding collapsed?

Rebuilds the pretraining run from the checkpoint's ``macl`` block (plans, configuration, method,
options), loads its weights and heads (``weights_only``), and prints on a fixed batch of real samples
of the dataset it was trained on: the mean pairwise cosine of the pooled descriptors and of the
projections, Lg against its chance value log(2B - 1), and the mean absolute bottleneck activation.
``--init`` prints the same for the freshly initialised network (what pretraining starts from).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile

import torch


def config_from_meta(meta: dict) -> "MACLConfig":
    """The pretraining's configuration from a checkpoint's ``macl`` block, as it was trained: options the
    checkpoint predates take the value of that time, not today's default; no workers, no compile."""
    from nnunetv2_macl.training.config import MACLConfig

    stored = meta.get("config") or {}
    fields = {f.name for f in dataclasses.fields(MACLConfig)}
    options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in stored.items() if k in fields}
    if "ler_content_mask" not in stored:
        options["ler_content_mask"] = False  # checkpoints before 0.3: their LER ran over every cell
    return MACLConfig(**{**options, "num_workers": 0, "compile": False})


def diagnose_checkpoint(checkpoint: str, batch_size: int | None = None, at_initialisation: bool = False,
                        device: str = "cpu") -> dict[str, float]:
    from nnunetv2_macl.run.pretrain import load_plans_and_dataset_json
    from nnunetv2_macl.training.checkpoint import CheckpointError, load_checkpoint
    from nnunetv2_macl.training.config import MACLConfig
    from nnunetv2_macl.training.pretrainer import MACLPretrainer

    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    meta = ckpt.get("macl")
    if not isinstance(meta, dict) or not isinstance(ckpt.get("network_weights"), dict):
        raise CheckpointError(f"{checkpoint} is not a MACL pretraining checkpoint (no 'macl'/'network_weights')")
    cfg = config_from_meta(meta)
    if batch_size is not None:
        cfg.batch_size = batch_size
    plans, dataset_json, preprocessed = load_plans_and_dataset_json(meta["dataset_name"], meta["plans_identifier"])
    with tempfile.TemporaryDirectory() as scratch:  # nothing is written there: no training starts
        trainer = MACLPretrainer(plans, meta["configuration"], dataset_json, preprocessed, scratch, cfg,
                                 torch.device(device))
        trainer.initialize()
        if not at_initialisation:
            trainer.network.load_state_dict(ckpt["network_weights"], strict=True)
            heads = ckpt.get("heads")
            if isinstance(heads, dict):
                trainer.macl.load_state_dict({**{"network." + k: v for k, v in ckpt["network_weights"].items()},
                                              **heads}, strict=True)
        return trainer.compute_diagnostics()


def main(argv: list[str] | None = None) -> int:
    from nnunetv2_macl.errors import USER_ERRORS
    from nnunetv2_macl.run.pretrain import one_line
    from nnunetv2_macl.training.diagnostics import format_diagnostics, is_collapsed

    p = argparse.ArgumentParser(prog="macl_diagnose", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint_final.pth or checkpoint_latest.pth of macl_pretrain")
    p.add_argument("--batch-size", type=int, default=None, help="samples in the batch (default: the run's)")
    p.add_argument("--init", action="store_true", help="diagnose the freshly initialised network instead")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    args = p.parse_args(argv)
    try:
        d = diagnose_checkpoint(args.checkpoint, args.batch_size, args.init, args.device)
    except USER_ERRORS as e:
        print(f"macl_diagnose: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    if d is None:
        print("macl_diagnose: this run has no image-level loss (Lg weight 0); nothing to diagnose")
        return 0
    print(format_diagnostics(d))
    if is_collapsed(d["Lg"], d["Lg_chance"]):
        print("image-level loss at chance: the embeddings have collapsed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
