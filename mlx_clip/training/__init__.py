"""The training program: everything `python -m mlx_clip.train` runs beyond the library.

build.py        build_training: model + optimizer + compiled step + run state, the one place they are made
loop.py         train(): set-up, the step loop, finish
evaluate.py     held-out metrics and val loss; the config's eval sets (eval.sets), read once, evaluated
state.py        RunState: what a checkpoint's state.json records, to and from JSON
loss.py         contrastive objectives (clip, siglip, hard_negative, multi_scale), distillation, gathering
distill.py      loss.distill: a teacher's stored embeddings aligned to the train loader, rows per batch
optim.py        AdamW / Lion groups, learning-rate schedules, tower locking (rules: optim_rules.py)
ema.py          the EMA of the trainable weights (train.ema_decay)
accum.py        gradient caching over micro-batches (optim.accum_steps)
temperature.py  temperature schedules
distributed.py  data parallel over mx.distributed
checkpoint.py   atomic run checkpoints, finding the one to resume, pruning (this run's only)
run_dir.py      one process (OUT/.lock) and one run (refuse other runs' checkpoints) per OUT
resume.py       --resume: what changed since the checkpoint, refusing what breaks exactness
logging.py      metrics.jsonl, progress line, curves.png, TensorBoard, eval_sets.json
autobatch.py    data.batch_size auto
"""
