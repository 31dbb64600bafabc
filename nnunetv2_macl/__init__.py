"""MACL (multi-level asymmetric contrastive learning) pretraining for nnU-Net v2."""
__version__ = "0.3.0"
