"""torch_ref: the PyTorch mirror of mlx_clip (cpu / mps / cuda).

Same class names, attribute names and checkpoint keys as mlx_clip; images are
NCHW here. Used for parity tests, weight exchange and benchmarks.
"""

from .device import pick_device
from .loss import clip_loss
from .model import CLIP, create_model
from .weights import load_weights, save_weights

__all__ = ["CLIP", "clip_loss", "create_model", "load_weights", "pick_device", "save_weights"]
