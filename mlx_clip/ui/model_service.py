"""The models behind the web app and its JSON API: checkpoints loaded on first use, and one
inference thread that does all MLX work, batching what concurrent requests send.

Request threads decode and preprocess their own uploads (PIL, numpy: in parallel, and a bad
upload fails in its own request) and submit jobs; the inference thread takes a job, gathers the
queued jobs of the same kind and model up to `max_batch` items, runs them as one forward pass and
hands each its rows. The queue holds at most `max_pending` jobs: one more is refused (Busy, a 429),
so a flood of requests waits in the clients, not in this process's memory.

Everything a model does here is mlx_clip.inference's: load, encode_images / encode_texts,
zero_shot_probs, and index_folder with the `predict --index` cache (FOLDER/.mlx_clip_index/).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .runs import RunsFolder

INDEX_TTL_S = 10.0  # a folder's index is rescanned (one stat per file) at most this often
MAX_MODELS = 2  # loaded checkpoints kept; the least recently loaded one is dropped
DEFAULT_TTL_S = 2.0  # how long the newest checkpoint (the default model) is taken as known


class Busy(Exception):
    """The job queue is full; the request is refused (HTTP 429) rather than queued."""


@dataclass
class Loaded:
    name: str
    path: Path  # the step_N directory
    model: object
    tokenizer: object
    preprocess: object  # inference.Preprocess with the training bomb limits (data/decode.py)
    sha256: str  # of model.safetensors: the index cache's key
    indexes: dict = field(default_factory=dict)  # folder name -> (time, FolderIndex)


@dataclass
class Job:
    kind: str  # "load", "images", "texts", "classify", "search", "captions"
    model: str
    items: list  # preprocessed images (S, S, 3) or texts: what gets batched
    args: dict = field(default_factory=dict)
    future: Future = field(default_factory=Future)


BATCHED = ("images", "texts", "classify", "captions")


def _batch_kind(job: Job) -> str | None:
    """Jobs that share a forward pass: images (embeddings, classify, captions) or texts."""
    if job.kind == "texts":
        return "texts"
    return "images" if job.kind in BATCHED else None


class ModelService:
    def __init__(
        self,
        runs: RunsFolder,
        folders: dict[str, Path],
        checkpoints: dict[str, Path] | None = None,
        max_batch: int = 32,
        max_pending: int = 64,
        batch_wait_s: float = 0.005,
    ):
        self.runs, self.folders = runs, folders
        self.extra = dict(checkpoints or {})  # --checkpoint: name -> path outside the runs folder
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_pending)
        self.loaded: collections.OrderedDict[str, Loaded] = collections.OrderedDict()
        self.backlog: collections.deque[Job] = collections.deque()
        self.batches = 0  # forward passes run (tests check that requests were batched)
        self.default: tuple[float, str | None] = (0.0, None)  # (when looked up, name): default_model
        self.thread = threading.Thread(target=self._serve, name="mlx_clip-inference", daemon=True)
        self.thread.start()

    # -- what can be loaded --------------------------------------------------------------------

    def checkpoints(self) -> list[dict]:
        """Runs with a checkpoint (newest first), then the --checkpoint ones."""
        found = []
        for run in self.runs.run_dirs():
            if (run / "checkpoints" / "latest").exists():
                found.append((run.stat().st_mtime, self.runs.name_of(run)))
        names = [n for _, n in sorted(found, reverse=True)] + list(self.extra)
        return [{"name": n, "loaded": n in self.loaded} for n in names]

    def caption_pool(self, limit: int = 4096) -> list[str]:
        """The indexed folders' captions: the lines of the .txt files beside their images (the
        built-in dataset's folder layout), without duplicates, at most `limit`."""
        seen: dict[str, None] = {}
        for folder in self.folders.values():
            for path in sorted(folder.rglob("*.txt")):
                if any(p.startswith(".") for p in path.relative_to(folder).parts):
                    continue
                try:
                    lines = path.read_text(errors="replace").splitlines()
                except OSError:
                    continue
                seen.update((t.strip(), None) for t in lines if t.strip())
                if len(seen) >= limit:
                    return list(seen)[:limit]
        return list(seen)

    def default_model(self) -> str:
        """The newest checkpoint's name, looked up again at most every DEFAULT_TTL_S (a walk of
        the runs folder per request would cost more than a small model's forward pass)."""
        when, name = self.default
        if name is None or time.monotonic() - when > DEFAULT_TTL_S:
            names = [c["name"] for c in self.checkpoints()]
            if not names:
                raise KeyError("no checkpoint: train a run into the runs folder or pass --checkpoint")
            name = names[0]
            self.default = (time.monotonic(), name)
        return name

    def _path(self, name: str) -> Path:
        if name in self.extra:
            return self.extra[name]
        run = self.runs.resolve(name)  # KeyError for anything outside the runs folder
        if not (run / "checkpoints" / "latest").exists():
            raise KeyError(f"run {name!r} has no checkpoint yet")
        return run

    # -- the request side ----------------------------------------------------------------------

    def submit(self, kind: str, model: str | None, items=(), timeout: float = 120.0, **args):
        """Run one job on the inference thread and wait for its result (its exception re-raised)."""
        job = Job(kind, model or self.default_model(), list(items), args)
        if job.model not in self.loaded:
            self._path(job.model)  # an unknown model fails here, in the request
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self.jobs.maxsize} requests are waiting; try again shortly") from None
        return job.future.result(timeout)

    def model(self, name: str | None) -> Loaded:
        """The loaded checkpoint (loading it on the inference thread the first time; after that
        without a round trip there, so that a request's one job is all the thread sees of it)."""
        loaded = self.loaded.get(name or self.default_model())
        return loaded if loaded is not None else self.submit("load", name)

    # -- the inference thread ------------------------------------------------------------------

    def _next(self, block: bool) -> Job | None:
        if self.backlog:
            return self.backlog.popleft()
        try:
            return self.jobs.get(block=block, timeout=None if block else 0)
        except queue.Empty:
            return None

    def _gather(self, first: Job) -> list[Job]:
        """`first` and the waiting jobs that can share its forward pass (same model and batch
        kind), up to max_batch items; the others keep their order in the backlog."""
        kind, group, count = _batch_kind(first), [first], len(first.items)
        if kind is None:
            return group
        time.sleep(self.batch_wait_s)  # let requests arriving together join one batch
        waiting = list(self.backlog)
        self.backlog.clear()
        while True:
            try:
                waiting.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        for job in waiting:
            same = _batch_kind(job) == kind and job.model == first.model
            if same and count + len(job.items) <= self.max_batch:
                group.append(job)
                count += len(job.items)
            else:
                self.backlog.append(job)
        return group

    def _serve(self) -> None:
        while True:
            group = self._gather(self._next(block=True))
            try:
                results = self._run(group)
            except Exception as e:  # one failure answers every request in the batch
                for job in group:
                    job.future.set_exception(e)
                continue
            for job, result in zip(group, results, strict=True):
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _load(self, name: str) -> Loaded:
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return self.loaded[name]
        from ..data.decode import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_IMAGE_PIXELS
        from ..inference import Preprocess, load
        from ..models.locate import model_sha256, resolve_checkpoint

        ckpt = resolve_checkpoint(self._path(name))
        model, tokenizer, pre = load(ckpt)
        # Uploads get training's decompression-bomb and aspect limits, not only PIL's own.
        pre = Preprocess(pre.image_size, DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_IMAGE_PIXELS, pre.settings)
        loaded = Loaded(
            name, ckpt, model, tokenizer, pre, model_sha256(ckpt, verified=True)
        )  # load() verified
        self.loaded[name] = loaded
        while len(self.loaded) > MAX_MODELS:
            self.loaded.popitem(last=False)
        return loaded

    def _run(self, group: list[Job]) -> list:
        from ..inference import encode_images, encode_texts

        m = self._load(group[0].model)
        kind = group[0].kind
        if kind == "load":
            return [m]
        if kind == "search":
            return [self._search(m, group[0])]
        self.batches += 1
        items = [x for job in group for x in job.items]
        if kind == "texts":
            feats = encode_texts(m.model, m.tokenizer, items)
        else:  # already preprocessed in the request threads: the identity as preprocess
            feats = encode_images(m.model, lambda x: x, items, batch_size=self.max_batch)
        out, start = [], 0
        for job in group:
            rows = feats[start : start + len(job.items)]
            start += len(job.items)
            try:
                out.append(self._finish(m, job, rows))
            except Exception as e:  # bad labels in one request fail that request only
                out.append(e)
        return out

    def _finish(self, m: Loaded, job: Job, rows: np.ndarray):
        from ..inference import probability_kind, zero_shot_probs

        if job.kind == "classify":
            probs = zero_shot_probs(m.model, m.tokenizer, rows, job.args["labels"], job.args["templates"])
            return {"probs": probs, "probability": probability_kind(m.model)}
        if job.kind == "captions":
            return self._captions(m, rows, job.args["captions"], job.args["top"])
        return rows  # embeddings

    def _captions(self, m: Loaded, rows: np.ndarray, captions: list[str], top: int) -> list:
        from ..inference import encode_texts

        text = encode_texts(m.model, m.tokenizer, captions)  # (C, E)
        scores = rows @ text.T  # (N, C) cosines
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
        return [[(captions[j], float(s[j])) for j in o] for s, o in zip(scores, order, strict=True)]

    def _search(self, m: Loaded, job: Job) -> dict:
        from ..inference import encode_texts, index_folder

        folder = job.args["folder"]
        when, index = m.indexes.get(folder, (0.0, None))
        if index is None or time.monotonic() - when > INDEX_TTL_S:
            index = index_folder(m.model, m.preprocess, self.folders[folder], m.sha256)
            m.indexes[folder] = (time.monotonic(), index)
        texts = encode_texts(m.model, m.tokenizer, job.items)
        return {
            "images": len(index.paths),
            "cache": str(index.cache_file) if index.cache_file else None,
            "results": [index.search(t, job.args["top"]) for t in texts],
        }
