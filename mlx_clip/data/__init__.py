"""Data: from files on disk to seeded, rank-aware batches of images and token ids.

samples.py     what readers produce: samples, skip records, errors naming the file; caption checks
readers.py     own-data formats (csv/tsv, json/jsonl, folders) -> samples
tar_shards.py  WebDataset tar shards, indexed in place (never extracted)
parquet.py     Parquet files, indexed by (file, row group, row); hf_disk.py: `datasets` folders (hf:DIR)
named.py       named datasets as their publishers ship them: coco:ROOT, flickr30k:ROOT, cc3m:ROOT ([:split])
columnar.py    their image cells, read one row group at a time at decode time; the column choice
checks.py      bad-data checks before training (bad images and captions skipped and logged)
decode.py      the one bounded way an image becomes pixels: header limits, then only the crop decoded
transforms.py  a model's preprocessing (ImagePreprocess.of(model config); CLIP's by default) and
               train-time augmentation
sampler.py     batch orders: random, hard-negative, a weighted mixture of sources
pipeline.py    the mlx-data loader: batches as a pure function of (seed, epoch, index)
resolution.py  data.resolution_schedule: the image size of each training step (progressive resizing)
sample_maker.py  one sample of it: caption of the epoch, decoded image, substitute for a bad one
workers.py     its boundary with mlx-data's threads: callback errors raised by the consumer, streams closed
synthetic.py   the built-in dataset (`python -m mlx_clip.data.synthetic` writes it to disk), built from
  synthetic_scene.py (shapes, colours, placement, rendering) and synthetic_captions.py (captions, prompts)
run_data.py    what a run reads: train and held-out sets plus the tokenizer
embedding_store.py  stored per-sample embeddings (a teacher's, for loss.distill), keyed by sample id
"""
