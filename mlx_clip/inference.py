"""Inference with a trained checkpoint: load it, embed images and texts, classify zero-shot, and
keep a folder's image embeddings in an on-disk index for text search.

    model, tokenizer, preprocess = mlx_clip.load("runs/X")            # run dir, checkpoints/ or step_N/
    feats = encode_images(model, preprocess, ["a.jpg", "b.png"])      # (N, E) unit vectors (numpy)
    probs = zero_shot_probs(model, tokenizer, feats, ["cat", "a dog"])  # (N, C) in [0, 1]

Zero-shot probabilities follow the objective the model was trained with: a CLIP model (softmax
loss) gives a softmax over the labels, each row summing to 1; a SigLIP model (loss.type siglip: it
has a learnable `logit_bias`) gives each label its own sigmoid(logit_scale * cos + logit_bias),
independent of the other labels (`probability_kind` tells which).

Index cache (`index_folder`): FOLDER/.mlx_clip_index/ (or CACHE/<folder name>-<path hash>/) holds,
per model, `<sha16>.safetensors` (tensor "embeddings", (N, E) float32) and `<sha16>.json` (the
manifest: one {path, size, mtime_ns, ino, ctime_ns} per row), where sha16 starts the sha256 of the
checkpoint's model.safetensors, so another model never reuses them (a model loaded with
quantize= adds its quantization, `<sha16>-q8g64.*`). Both files are written to a
temporary name and renamed; the manifest, renamed last, carries a random `generation` that must
equal the one in the safetensors header, so a half-finished update reads as "no cache" and is rebuilt.
A row is reused while size, mtime, inode and ctime are unchanged: a file replaced with the same size
and a restored mtime (cp -p, tar x, os.utime) gets a new inode (rename) or ctime (any write), which
no user can set back; one stat, where a content hash would read every image on every search.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .config import load_config
from .data.decode import DEFAULT_MAX_ASPECT_RATIO, decode_image
from .data.samples import DataError
from .data.transforms import CLIP_PREPROCESS, ImagePreprocess
from .evaluation.metrics import zero_shot_classifier
from .models.adapters import load_model
from .models.config import ModelConfig
from .models.locate import checkpoint_weights, resolve_checkpoint, verify_files
from .models.model import CLIP, LOGIT_SCALE_MAX
from .models.quantize import check_quantization, quantization, quantize_model
from .models.streams import Encoders
from .text.tokenizer import Tokenizer
from .text.vocab import load_tokenizer

# CLIP-style prompt ensemble. Every template puts an article right before "{}", which a label that
# brings its own article ("a cat", "the sea") replaces (see `prompts_for`).
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a cropped photo of a {}.",
    "a drawing of a {}.",
)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
INDEX_DIR = ".mlx_clip_index"
INDEX_VERSION = 2  # 2: rows keyed by (size, mtime_ns, ino, ctime_ns); 1 had size and mtime only


class SkippedImageWarning(UserWarning):
    """An image that could not be read was left out (search mode)."""


class Preprocess:
    """Image path, encoded bytes (an upload), PIL image or uint8 array -> float32 (S, S, 3): the
    model's eval preprocessing (`settings`, from its ModelConfig: CLIP's by default), decoding and
    resizing only what it keeps (data/decode.py).

    A path or bytes whose longer side is over `max_aspect_ratio` times the shorter (None: any) or
    with more than `max_image_pixels` pixels (None: PIL's own limit) is a DataError naming it."""

    def __init__(
        self,
        image_size: int,
        max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
        max_image_pixels: int | None = None,
        settings: ImagePreprocess = CLIP_PREPROCESS,
    ):
        self.image_size, self.settings = image_size, settings
        self.max_aspect_ratio, self.max_image_pixels = max_aspect_ratio, max_image_pixels
        self.transform = settings.eval_transform(image_size)

    def __call__(self, image) -> np.ndarray:
        if not isinstance(image, (str, os.PathLike, bytes)):
            return self.transform(image)
        limits = dict(max_pixels=self.max_image_pixels, max_aspect=self.max_aspect_ratio)
        return decode_image(image if isinstance(image, bytes) else str(image), self.transform, **limits)


def _model_config_and_tokenizer_kind(ckpt: Path):
    cfg_path = ckpt / "config.yaml"
    if cfg_path.is_file():
        cfg = load_config(cfg_path, log=None)  # a checkpoint's own config: no deprecation warnings
        return cfg.model_config(), cfg.tokenizer.kind
    # No run config: save_weights also records the ModelConfig in the safetensors header.
    with safe_open(str(ckpt / "model.safetensors"), "np") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise FileNotFoundError(f"{cfg_path}: missing, and {ckpt / 'model.safetensors'} records no config")
    return ModelConfig.from_dict(json.loads(meta["config"])), "auto"


def load(
    path: str | Path,
    verify: bool = True,
    quantize: int | None = None,
    group_size: int = 64,
    ema: bool = False,
) -> tuple[CLIP, Tokenizer, Preprocess]:
    """A checkpoint (step_N/, checkpoints/ or run directory) -> (model, tokenizer, preprocess).

    The model is in eval mode with its weights loaded (ema=True: the EMA weights a run with
    train.ema_decay saved as ema.safetensors); the tokenizer pads to the model's context
    length; preprocess maps a PIL image or a path to float32 (S, S, 3). Where the checkpoint has
    checksums (state.json), its files are checked first, unless verify=False. quantize=4 or 8
    quantizes its linear layers after loading, in groups of `group_size` (models/quantize.py)."""
    if quantize is not None:
        check_quantization(quantize, group_size)
    ckpt = resolve_checkpoint(path)
    if verify:
        verify_files(ckpt, hint="; --no-verify (CLI) or verify=False skips this check")
    weights = checkpoint_weights(ckpt, ema)
    mcfg, tok_kind = _model_config_and_tokenizer_kind(ckpt)
    model = load_model(mcfg, weights)  # a LoRA checkpoint: its base + adapters
    model.eval()
    if quantize is not None:
        quantize_model(model, quantize, group_size)
    try:
        tokenizer = load_tokenizer(ckpt)
    except FileNotFoundError:
        if tok_kind in ("auto", "trained"):
            raise FileNotFoundError(f"{ckpt}: no tokenizer (tokenizer.json, tokenizer_config.json)") from None
        tokenizer = load_tokenizer(tok_kind)  # "openai" or a path named in config.yaml
    if tokenizer.vocab_size != mcfg.vocab_size:
        raise ValueError(f"{ckpt}: tokenizer has {tokenizer.vocab_size} tokens, model {mcfg.vocab_size}")
    tokenizer.context_length = mcfg.context_length
    return model, tokenizer, Preprocess(mcfg.image_size, settings=ImagePreprocess.of(mcfg))


# ---------------------------------------------------------------------------
# Embeddings and zero-shot classification


def encode_images(model, preprocess, images, batch_size: int = 32, skip_errors: bool = False) -> np.ndarray:
    """Paths or PIL images -> (N, E) float32 unit vectors. Like every encoder call here, each batch
    runs split over the CPU cores, through the compiled tower (models/streams.Encoders).

    An unreadable path raises a DataError naming it; with skip_errors it is reported as a
    SkippedImageWarning instead and its row is NaN."""
    images = list(images)
    out = np.full((len(images), model.config.embed_dim), np.nan, np.float32)
    for start in range(0, len(images), batch_size):
        rows, arrays = [], []
        for i in range(start, min(start + batch_size, len(images))):
            try:
                arrays.append(preprocess(images[i]))
            except DataError as e:
                if not skip_errors:
                    raise
                warnings.warn(f"skipped {e}", SkippedImageWarning, stacklevel=2)
                continue
            rows.append(i)
        if rows:
            out[rows] = Encoders.of(model).image(np.stack(arrays))  # (b, S, S, 3) -> (b, E)
    return out


def encode_texts(model, tokenizer, texts, batch_size: int = 256) -> np.ndarray:
    """Texts -> (N, E) float32 unit vectors."""
    texts, ctx, encode = list(texts), model.config.context_length, Encoders.of(model).text
    parts = [encode(tokenizer(texts[i : i + batch_size], ctx)) for i in range(0, len(texts), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, model.config.embed_dim), np.float32)


_LABEL_ARTICLE = re.compile(r"^(a|an|the)\s", re.IGNORECASE)
_TEMPLATE_ARTICLE = re.compile(r"\b(a|an)\s+\{\}", re.IGNORECASE)


def prompts_for(label: str, templates=DEFAULT_TEMPLATES) -> list[str]:
    """The prompts that stand for one label.

    No templates, or a label that is a sentence (ends with . ! or ?): the label as it is.
    Otherwise every template with "{}" replaced by the label; a label that brings its own article
    ("a cat", "the sea") takes the place of the template's "a {}" / "an {}", so "a photo of a {}."
    gives "a photo of a cat." for both "cat" and "a cat"."""
    label = label.strip()
    if not templates or label.endswith((".", "!", "?")):
        return [label]
    own_article = _LABEL_ARTICLE.match(label) is not None
    prompts = []
    for t in templates:
        if own_article:
            t = _TEMPLATE_ARTICLE.sub("{}", t)
        prompts.append(t.replace("{}", label))
    return list(dict.fromkeys(prompts))  # drop duplicates, keep order


def class_embeddings(model, tokenizer, labels, templates=DEFAULT_TEMPLATES) -> np.ndarray:
    """(C, E) prompt-ensembled class vectors: mean of the unit prompt embeddings, renormalised."""
    groups = [prompts_for(label, templates) for label in labels]
    feats = encode_texts(model, tokenizer, [p for g in groups for p in g])
    out, start = [], 0
    for g in groups:
        out.append(zero_shot_classifier(feats[None, start : start + len(g)])[0])  # (1, T, E) -> (E,)
        start += len(g)
    return np.stack(out)


def logit_scale(model) -> float:
    """exp(model.logit_scale), clamped at 100 as in training."""
    return float(np.exp(min(model.logit_scale.item(), LOGIT_SCALE_MAX)))


def logit_bias(model) -> float | None:
    """SigLIP's learned bias, or None for a model without one (trained with a softmax loss)."""
    bias = getattr(model, "logit_bias", None)
    return None if bias is None else float(bias.item())


def probability_kind(model) -> str:
    """How zero_shot_probs scores: "sigmoid" (per label) with a logit_bias, else "softmax" (over labels)."""
    return "softmax" if logit_bias(model) is None else "sigmoid"


def zero_shot_probs(model, tokenizer, images, labels, templates=DEFAULT_TEMPLATES) -> np.ndarray:
    """(N, C) probabilities of each label for each image, as the model was trained to score pairs.

    CLIP (no logit_bias): softmax over the labels of logit_scale * cos; each row sums to 1.
    SigLIP (a logit_bias): sigmoid(logit_scale * cos + logit_bias) for every label on its own, the
    pairwise objective it was trained with; a row need not sum to 1 (no label may fit, or several).
    cos is the cosine of the image with the label's prompt-ensembled class vector.

    images: preprocessed float32 (N, S, S, 3), or image features (N, E) from encode_images."""
    images = np.asarray(images, np.float32)
    if images.ndim == 4:
        images = np.concatenate(
            [Encoders.of(model).image(images[i : i + 64]) for i in range(0, len(images), 64)]
        )
    feats = images / np.linalg.norm(images, axis=-1, keepdims=True)
    cos = (feats @ class_embeddings(model, tokenizer, labels, templates).T).astype(np.float64)  # (N, C)
    logits = logit_scale(model) * cos
    bias = logit_bias(model)
    if bias is not None:  # sigmoid(x) = exp(-log(1 + exp(-x))): no overflow for any x
        return np.exp(-np.logaddexp(0.0, -(logits + bias))).astype(np.float32)
    logits -= logits.max(axis=1, keepdims=True)  # stable softmax
    probs = np.exp(logits)
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------
# Folder index for text search


@dataclass
class FolderIndex:
    root: Path
    paths: list[str]  # relative POSIX paths, sorted; row i of features is paths[i]
    features: np.ndarray  # (N, E) unit vectors
    cache_file: Path | None  # None when the cache could not be written
    embedded: int = 0
    reused: int = 0
    removed: int = 0
    skipped: list[str] = field(default_factory=list)

    def search(self, text_features: np.ndarray, top: int = 10) -> list[tuple[str, float]]:
        """(path, cosine similarity) of the `top` images closest to one (E,) unit text vector."""
        scores = self.features @ text_features  # (N,)
        order = np.argsort(-scores, kind="stable")[:top]
        return [(self.paths[i], float(scores[i])) for i in order]


FILE_KEY = ("size", "mtime_ns", "ino", "ctime_ns")  # what must be unchanged to reuse a row (module doc)


def scan_images(root: Path) -> dict[str, tuple[int, ...]]:
    """Relative POSIX path -> (size, mtime_ns, ino, ctime_ns) of every image below root, hidden
    entries excluded."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # also skips .mlx_clip_index
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath, name)
            try:
                st = path.stat()
            except OSError:  # a dangling symlink, or removed while scanning
                continue
            if stat.S_ISREG(st.st_mode):
                found[path.relative_to(root).as_posix()] = (
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ino,
                    st.st_ctime_ns,
                )
    return dict(sorted(found.items()))


def cache_files(
    root: Path, model_sha256: str, cache_dir: str | Path | None = None, quantized: str | None = None
) -> tuple[Path, Path]:
    """(embeddings .safetensors, manifest .json) of one folder and one model (`quantized`: its
    quantization, "q8g64", or None in float)."""
    if cache_dir is None:
        directory = root / INDEX_DIR
    else:  # a shared cache directory: one subdirectory per indexed folder
        tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
        directory = Path(cache_dir) / f"{root.resolve().name}-{tag}"
    stem = model_sha256[:16] + (f"-{quantized}" if quantized else "")
    return directory / f"{stem}.safetensors", directory / f"{stem}.json"


def _read_cache(emb_path: Path, manifest_path: Path, model_sha256: str, quantized: str | None, dim: int):
    """path -> ((size, mtime_ns, ino, ctime_ns), (E,) vector) from a consistent cache, else None."""
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        with safe_open(str(emb_path), "np") as f:
            generation = (f.metadata() or {}).get("generation")
            emb = f.get_tensor("embeddings")
        files = manifest["files"]
        if manifest.get("version") != INDEX_VERSION:
            raise ValueError(f"index version {manifest.get('version')}, this mlx_clip writes {INDEX_VERSION}")
        ok = (
            manifest.get("model_sha256") == model_sha256
            and manifest.get("quantization") == quantized
            and manifest.get("generation") == generation
            and emb.shape == (len(files), dim)
        )
        if ok:
            return {f["path"]: (tuple(f[k] for k in FILE_KEY), emb[i]) for i, f in enumerate(files)}
        reason = "inconsistent or from another model"
    except Exception as e:  # unreadable / corrupt JSON or safetensors: rebuild
        reason = str(e)
    warnings.warn(f"index cache {manifest_path} ignored ({reason}); rebuilding it", stacklevel=3)
    return None


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is as readable as the images
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_cache(emb_path: Path, manifest_path: Path, manifest: dict, features: np.ndarray) -> None:
    emb_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"generation": manifest["generation"], "model_sha256": manifest["model_sha256"]}
    _atomic_write(emb_path, lambda tmp: save_file({"embeddings": features}, tmp, metadata=meta))
    _atomic_write(manifest_path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))


def index_folder(
    model, preprocess, folder, model_sha256: str, cache_dir=None, batch_size: int = 32
) -> FolderIndex:
    """Embeddings of every image below `folder`, reusing the cached ones (per model file and
    quantization) whose size, mtime, inode and ctime are unchanged (module doc); new or changed files
    are embedded, deleted ones dropped, unreadable ones skipped with a SkippedImageWarning. The
    cache is rewritten only when something changed."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    dim, quantized = model.config.embed_dim, quantization(model)
    emb_path, manifest_path = cache_files(root, model_sha256, cache_dir, quantized)
    current = scan_images(root)
    cached = _read_cache(emb_path, manifest_path, model_sha256, quantized, dim)
    known = cached or {}
    feats = {p: known[p][1] for p, st in current.items() if p in known and known[p][0] == st}
    todo = [p for p in current if p not in feats]
    skipped = []
    if todo:
        new = encode_images(model, preprocess, [root / p for p in todo], batch_size, skip_errors=True)
        for p, f in zip(todo, new, strict=True):
            if np.isfinite(f).all():
                feats[p] = f
            else:
                skipped.append(p)
    paths = [p for p in current if p in feats]
    features = np.stack([feats[p] for p in paths]) if paths else np.zeros((0, dim), np.float32)
    index = FolderIndex(root, paths, features.astype(np.float32), emb_path)
    index.embedded, index.skipped = len(todo) - len(skipped), skipped
    index.reused, index.removed = len(paths) - index.embedded, len(set(known) - set(current))
    if cached is None or index.embedded or index.removed or len(paths) != len(known):
        manifest = {
            "version": INDEX_VERSION,
            "model_sha256": model_sha256,
            "quantization": quantized,
            "generation": uuid.uuid4().hex,
            "image_size": preprocess.image_size,
            "files": [{"path": p, **dict(zip(FILE_KEY, current[p], strict=True))} for p in paths],
        }
        try:
            _write_cache(emb_path, manifest_path, manifest, index.features)
        except OSError as e:
            index.cache_file = None
            warnings.warn(
                f"cannot write the index cache in {emb_path.parent} ({e.strerror or e}); embeddings are "
                "not kept: pass --cache DIR (cache_dir=) to store them elsewhere",
                stacklevel=2,
            )
    return index
