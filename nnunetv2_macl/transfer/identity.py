"""What a MACL checkpoint is: its format, the format's version, and the method's citation.

Written at the top level of every pretraining checkpoint next to ``network_weights`` and the
``macl`` metadata block, and read (and the citation printed) when fine-tuning starts.

Format versions:
- 1: ``network_weights`` + ``macl`` (no ``format`` fields; checkpoints written before this file).
- 2: adds ``format``, ``format_version``, ``citation``, and ``macl.datasets`` (every dataset of the
  pretraining with its number of samples and share of an epoch).
"""
from __future__ import annotations

from nnunetv2_macl.errors import UnsupportedCheckpointFormatError

CHECKPOINT_FORMAT = "nnunetv2_macl.pretraining"
CHECKPOINT_FORMAT_VERSION = 2

CITATION = (
    "Zeng, S. et al., \"Multi-level Asymmetric Contrastive Learning for Medical Image Segmentation "
    "Pre-training\", IEEE Journal of Biomedical and Health Informatics, 2026, doi:10.1109/JBHI.2026.3669549 "
    "(arXiv:2309.11876)",
    "Zeng, D. et al., \"Positional Contrastive Learning for Volumetric Medical Image Segmentation\", "
    "MICCAI 2021",
)


def checkpoint_identity() -> dict:
    """The top-level entries that say what a checkpoint is."""
    return {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION, "citation": list(CITATION)}


def checkpoint_format_version(checkpoint: dict) -> int:
    """The format version of a loaded checkpoint: 1 for MACL checkpoints without the field, 0 for
    checkpoints that are not MACL pretraining checkpoints (e.g. nnU-Net's own). Refuses a newer
    format than this package reads."""
    if checkpoint.get("format") == CHECKPOINT_FORMAT:
        version = int(checkpoint.get("format_version", 0))
        if version > CHECKPOINT_FORMAT_VERSION:
            raise UnsupportedCheckpointFormatError(
                f"The checkpoint has format version {version}; this nnunetv2_macl reads up to "
                f"{CHECKPOINT_FORMAT_VERSION}. Upgrade nnunetv2_macl.")
        return version
    return 1 if isinstance(checkpoint.get("macl"), dict) else 0


def citation_text(checkpoint: dict) -> str:
    """Lines to print when fine-tuning from ``checkpoint`` (the checkpoint's own citation, or the
    package's for MACL checkpoints of format 1)."""
    entries = checkpoint.get("citation") or (CITATION if checkpoint_format_version(checkpoint) else ())
    if not entries:
        return ""
    method = (checkpoint.get("macl") or {}).get("method", "macl")
    return "\n".join([f"Initialised from a self-supervised {str(method).upper()} pretraining. Please cite:"]
                     + [f"  - {e}" for e in entries])
