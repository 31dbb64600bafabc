"""The ``macl_pretrain`` command of a few-label pretraining and the configuration it resolves to.

One argument list (:func:`pretrain_arguments`) is both what the runner executes and what the
pretraining fingerprint is made of: it is parsed with ``macl_pretrain``'s own parser into the
:class:`~nnunetv2_macl.training.config.MACLConfig` the pretraining will use (method switches resolved,
every default filled in), so a changed default of ``macl_pretrain``, a new config field or another
``--pretrain-extra`` changes the fingerprint, and a mistyped extra option fails before anything runs.
"""
from __future__ import annotations

import contextlib
import io
import shlex
from typing import TYPE_CHECKING

from nnunetv2_macl.errors import FewLabelError, MACLUserError

if TYPE_CHECKING:
    from nnunetv2_macl.fewlabel.settings import Settings
    from nnunetv2_macl.training.config import MACLConfig

# MACLConfig fields that do not shape the pretrained weights, left out of the fingerprint (every other
# field, present or future, is in it). num_workers: the data stream is a function of (seed, epoch, index)
# whatever the workers; save_every, keep_epochs: which checkpoints are written only; amp / compile / channels_last: how the same
# computation runs on a device, like the device itself, which no fingerprint holds either (a measurement
# may continue on another machine); global_negatives: multi-GPU only, the protocol pretrains in one process.
NOT_SHAPING = ("num_workers", "save_every", "keep_epochs", "amp", "compile", "channels_last", "global_negatives")

# Switches added after runs were recorded, each with the fields it governs: while the switch is off, the
# pretraining computes exactly what it did before the switch existed (no extra random draws, no extra
# parameters), so the governed fields are left out and the recorded fingerprints stay valid.
OFF_SWITCHES = {"recon_weight": (0.0, ("recon_weight", "mask_ratio", "mask_block"))}

# macl_pretrain options the protocol sets itself: --pretrain-extra may not override them (the caption,
# the views and --resume rely on them); dest -> (option, what to do instead or why)
PROTOCOL_OPTIONS = {
    "dataset": ("-d", "it pretrains on its own view of the dataset"),
    "configuration": ("-c", "use macl_fewlabel -c"),
    "plans": ("-p", "use macl_fewlabel -p"),
    "plans_from": ("--plans-from", "it pretrains on one dataset"),
    "output_folder": ("-o", "it writes into its results folder"),
    "device": ("--device", "use macl_fewlabel --device"),
    "method": ("--method", "use macl_fewlabel --methods"),
    "epochs": ("--epochs", "use --pretrain-epochs"),
    "batch_size": ("--batch-size", "use --pretrain-batch-size"),
    "seed": ("--seed", "use --seed"),
    "num_workers": ("--num-workers", "use --pretrain-workers"),
    "save_every": ("--save-every", "it checkpoints every epoch for --resume"),
    "continue_training": ("--c", "use --resume"),
}


def split_extra(text: str | None) -> list[str]:
    """``--pretrain-extra``'s string as arguments (shell quoting rules)."""
    try:
        return shlex.split(text or "")
    except ValueError as e:
        raise FewLabelError(f"--pretrain-extra {text!r}: {e}") from None


def pretrain_arguments(s: "Settings", method: str) -> list[str]:
    """The arguments of ``macl_pretrain`` for ``method``'s pretraining (without the executable and ``--c``)."""
    return ["-d", str(s.dataset_id), "-c", s.configuration, "-p", s.plans, "--method", method, "--device", s.device,
            "--epochs", str(s.pretrain_epochs), "--batch-size", str(s.pretrain_batch_size),
            "--num-workers", str(s.pretrain_workers), "--seed", str(s.seed), "--save-every", "1",
            *split_extra(s.pretrain_extra)]


def _parse(argv: list[str], defaults: dict | None = None):
    """``macl_pretrain``'s parser on ``argv``; its usage errors as :class:`FewLabelError` (argparse exits)."""
    from nnunetv2_macl.run import pretrain

    parser = pretrain.build_parser()
    if defaults:
        parser.set_defaults(**defaults)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            return parser.parse_args(argv)
    except SystemExit as e:
        if not e.code:  # -h printed the help and exited
            raise FewLabelError("-h prints macl_pretrain's help (macl_pretrain -h); pass pretraining options") from None
        raise FewLabelError(" ".join(sink.getvalue().split()) or f"macl_pretrain's parser exited ({e.code})") from None


def check_pretrain_extra(s: "Settings") -> None:
    """Fail early on an ``--pretrain-extra`` that ``macl_pretrain`` would refuse or that overrides an
    option the protocol sets; also resolves the configuration of every pretraining (option errors)."""
    extra = split_extra(s.pretrain_extra)
    unset = object()
    owned = {dest: unset for dest in PROTOCOL_OPTIONS if dest != "dataset"}
    try:
        args = _parse(["-d", str(s.dataset_id), *extra], owned)
    except FewLabelError as e:
        raise FewLabelError(f"--pretrain-extra {s.pretrain_extra!r}: {e}") from None
    if args.dataset[:1] == [str(s.dataset_id)] and args.dataset[1:]:  # nargs="+" took them after our -d
        raise FewLabelError(f"--pretrain-extra {s.pretrain_extra!r}: stray value(s) {' '.join(args.dataset[1:])} "
                            f"(options only)")
    for dest, (option, instead) in PROTOCOL_OPTIONS.items():
        given = args.dataset != [str(s.dataset_id)] if dest == "dataset" else getattr(args, dest) is not unset
        if given:
            raise FewLabelError(f"--pretrain-extra {s.pretrain_extra!r} sets {option}, which the protocol sets "
                                f"itself ({instead})")
    for method in s.pretrain_methods():  # the values too (ConfigError), e.g. --lambdas 0,0,0
        pretrain_config(s, method)


def pretrain_config(s: "Settings", method: str) -> "MACLConfig":
    """The resolved configuration the pretraining of ``method`` runs with (as ``macl_pretrain`` builds it)."""
    from nnunetv2_macl.run import pretrain
    from nnunetv2_macl.training.config import resolve_method

    argv = pretrain_arguments(s, method)
    try:
        return resolve_method(pretrain.config_from_args(_parse(argv)))
    except MACLUserError as e:
        raise FewLabelError(f"macl_pretrain {shlex.join(argv)}: {' '.join(str(e).split())}") from None


def config_fingerprint(s: "Settings", method: str) -> dict:
    """Every field of the resolved configuration (``MACLConfig.to_dict``, i.e. its dataclass fields: a field
    added to MACLConfig is in it without a change here) except :data:`NOT_SHAPING` and the fields of a switch
    of :data:`OFF_SWITCHES` that is off."""
    return shaping_part(pretrain_config(s, method).to_dict())


def shaping_part(config: dict) -> dict:
    """The fields of a resolved configuration (``MACLConfig.to_dict``) that shape the pretrained weights."""
    left_out = set(NOT_SHAPING)
    for switch, (off, fields) in OFF_SWITCHES.items():
        if config[switch] == off:
            left_out.update(fields)
    return {k: v for k, v in config.items() if k not in left_out}
