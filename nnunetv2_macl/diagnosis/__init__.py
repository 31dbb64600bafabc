"""Why does handing the MACL-pretrained decoder stages to nnU-Net fine-tuning lose against the encoder only?

Measurements on a labeled nnU-Net preprocessed dataset (2d), for one ``macl_pretrain`` checkpoint
(command line: ``pretrain/decoder_diagnosis.py``; everything here is importable):

* E1 (:mod:`.stage_stats`): the decoder stages at iteration 0 on real slices, hand-over against the
  encoder-only start: norm parameters, output size, negative pre-activations, cosine between locations,
  upsampled against skip half of each stage input, spread of the deep-supervision logits.
* E2 / part (c) (:mod:`.finetune`): the first fine-tuning iterations from the starts of :mod:`.networks`
  (scratch, encoder-only, the hand-over, the hand-over with reset decoder norms, encoder + decoder stage 0)
  with nnU-Net's loss, optimiser, schedule, augmentation and clipping; per-group gradient norms and how
  often the clip bites.
* E3 / part (b) (:mod:`.probes`): linear probes on the frozen stages.
* E4 / part (a) (:mod:`.variance`): the within-slice share of each stage's variance, at full resolution and
  on the dominant branch's shrunk input.

:func:`.run.run_diagnosis` runs the chosen parts and writes the JSON / markdown report (:mod:`.report`).
"""
