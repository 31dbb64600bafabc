"""The few-label protocol on any nnU-Net dataset (``macl_fewlabel``; ``pretrain/fewlabel_benchmark.py``).

``splits`` (held-out validation set, nested budgets), ``views`` (read-only views of a preprocessed
dataset for the fine-tunings and the pretrainings), ``msd`` (Decathlon conversion), ``settings``,
``pretraining`` (the ``macl_pretrain`` command and the configuration it resolves to), ``records``
(folder layout, tasks, fingerprints, run log: what ``runner`` writes and ``report`` reads), ``runner``
(pretraining and fine-tuning tasks, resume, jobs), ``report`` (tables, CSV, Dice-vs-M plot), ``curves``
(learning curves from nnU-Net's training logs), ``overlay`` (validation slices).
"""
