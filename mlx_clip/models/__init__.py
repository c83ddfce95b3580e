"""The model library, in plain MLX: what a checkpoint holds and how it computes features.

config.py        ModelConfig: an architecture (configs/models/*.yaml), framework-free
transformer.py   attention, MLP, residual blocks, the vision and text towers
model.py         CLIP: the two towers, logit scale (and SigLIP's bias); features, never a loss
kernels.py       the one switch for backend-specific kernels (arithmetic GELUs on MLX's CPU backend)
streams.py       CPU-only: batch shards on several MLX streams (training steps, inference encoders)
weights.py       canonical safetensors: save, strict load, find a checkpoint directory
quantize.py      weight-only quantization of the linear layers, for inference
lora_config.py   the finetune section (LoRA / QLoRA) and which linears get adapters, framework-free
lora.py          LoRALinear (float or quantized base), apply, freeze, merge
adapters.py      LoRA checkpoints: adapters only + the base's path and sha256; loading them back
"""
