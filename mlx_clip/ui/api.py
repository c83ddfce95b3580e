"""The JSON serving API: request bodies (JSON or multipart/form-data) in, answers out.

  POST /v1/embeddings  {"input": "text" | ["text", ...]} or {"images": [BASE64, ...]} (or
                       multipart image files) -> the OpenAI embeddings response: {"object": "list",
                       "data": [{"object": "embedding", "index": i, "embedding": [...]}], "model",
                       "usage": {"prompt_tokens", "total_tokens"}}; unit vectors.
                       "encoding_format": "base64" gives each embedding as base64 float32 (little-endian).
  POST /v1/classify    {"image": BASE64, "labels": [...], "templates"?: [...]} -> {"model",
                       "probability": "softmax"|"sigmoid", "probs": {label: p}, "top": [{label, prob}]}
  POST /v1/search      {"query": "text" | [...], "folder"?: NAME, "top"?: k} -> per query the nearest
                       images of an indexed folder, with a thumbnail URL each
  POST /v1/captions    {"image": BASE64, "captions"?: [...], "top"?: k} -> the captions nearest the
                       image (default: the indexed folders' captions, the .txt files beside images)

Every request may name a "model" (a run with a checkpoint, see GET /api/models); the default is
the newest. Base64 may be a data: URL. In multipart, file parts are the images and the other
fields are the JSON keys ("labels" and "query" repeated, or one per line).
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import json

import numpy as np

MAX_IMAGES = 64  # per request
MAX_TEXTS = 256
MAX_LABELS = 200
MAX_QUERIES = 16
MAX_TOP = 100
MAX_CAPTIONS = 4096
LISTS = ("input", "images", "labels", "templates", "query", "captions")  # multipart fields as lists


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_request(content_type: str, body: bytes) -> dict:
    """A JSON object, or a multipart form as one (file parts -> "images": [bytes, ...])."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return _multipart(content_type, body)
    try:  # any other type is read as JSON: `curl -d '{...}'` sends it as a form
        request = json.loads(body or b"{}")
    except ValueError as e:
        raise BadRequest(
            f"the body is not JSON ({e}); send application/json or multipart/form-data"
        ) from None
    if not isinstance(request, dict):
        raise BadRequest("the body must be a JSON object")
    return request


def _multipart(content_type: str, body: bytes) -> dict:
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise BadRequest("a multipart/form-data body without parts (boundary missing?)")
    out: dict = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if part.get_filename() is not None or name in ("image", "images"):
            out.setdefault("images", []).append(data)
        elif name:
            text = data.decode("utf-8", errors="replace")
            if name in LISTS:
                out.setdefault(name, []).extend(t.strip() for t in text.splitlines() if t.strip())
            else:
                out[name] = text
    return out


def _texts(request: dict, key: str, limit: int, required: bool = True) -> list[str]:
    value = request.get(key)
    if value is None or value == [] or value == "":
        if required:
            raise BadRequest(f'"{key}" is missing')
        return []
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
        raise BadRequest(f'"{key}" must be a non-empty string or a list of them')
    if len(texts) > limit:
        raise BadRequest(f'"{key}" has {len(texts)} entries, over the limit of {limit}')
    return texts


def _image_bytes(request: dict) -> list[bytes]:
    """The request's images as encoded bytes: multipart files, or base64 strings (data: URLs too)."""
    items = request.get("images", [])
    if "image" in request:
        items = [request["image"], *items]
    items = items if isinstance(items, list) else [items]
    if len(items) > MAX_IMAGES:
        raise BadRequest(f"{len(items)} images, over the limit of {MAX_IMAGES} per request")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            out.append(item)
            continue
        if not isinstance(item, str):
            raise BadRequest(f"image {i}: expected a base64 string")
        if item.startswith("data:"):
            item = item.partition(",")[2]
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(f"image {i}: not valid base64") from None
    return out


def _decode(service, model: str | None, request: dict, required: bool = True):
    """(loaded model, preprocessed images); a DataError (not an image, over the pixel or aspect
    limits, truncated) is a 400 naming the image's place in the request."""
    from ..data.samples import DataError

    raw = _image_bytes(request)
    if required and not raw:
        raise BadRequest('no image: send "image" (base64) or a multipart file')
    m = service.model(model)
    arrays = []
    for i, data in enumerate(raw):
        try:
            arrays.append(m.preprocess(data))
        except DataError as e:
            raise BadRequest(f"image {i}: {e}") from None
    return m, arrays


def _top(request: dict, default: int) -> int:
    top = request.get("top", default)
    try:
        top = int(top)
    except (TypeError, ValueError):
        raise BadRequest('"top" must be an integer') from None
    if not 1 <= top <= MAX_TOP:
        raise BadRequest(f'"top" must be between 1 and {MAX_TOP}')
    return top


def embeddings(service, request: dict) -> dict:
    model = request.get("model")
    texts = _texts(request, "input", MAX_TEXTS, required=False)
    fmt = request.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise BadRequest('"encoding_format" must be "float" or "base64"')
    if texts and (request.get("images") or request.get("image")):
        raise BadRequest('send texts ("input") or images, not both in one request')
    if texts:
        m = service.model(model)
        feats = service.submit("texts", m.name, texts)
        tokens = int(np.count_nonzero(m.tokenizer(texts, m.model.config.context_length)))
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    else:
        m, arrays = _decode(service, model, request)
        feats = service.submit("images", m.name, arrays)
        usage = {"prompt_tokens": 0, "total_tokens": 0, "images": len(arrays)}
    data = []
    for i, row in enumerate(np.asarray(feats, np.float32)):
        vec = base64.b64encode(row.astype("<f4").tobytes()).decode() if fmt == "base64" else row.tolist()
        data.append({"object": "embedding", "index": i, "embedding": vec})
    return {"object": "list", "data": data, "model": m.name, "usage": usage}


def classify(service, request: dict) -> dict:
    from ..inference import DEFAULT_TEMPLATES

    labels = _texts(request, "labels", MAX_LABELS)
    if len(set(labels)) != len(labels):
        raise BadRequest('"labels" has duplicates')
    templates = request.get("templates")
    templates = DEFAULT_TEMPLATES if templates is None else _texts(request, "templates", 64, required=False)
    if any("{}" not in t for t in templates):
        raise BadRequest('every template needs a "{}" for the label')
    m, arrays = _decode(service, request.get("model"), request)
    out = service.submit("classify", m.name, arrays, labels=labels, templates=tuple(templates))
    results = []
    for row in out["probs"]:
        order = np.argsort(-row, kind="stable")
        results.append(
            {
                "probs": {label: float(p) for label, p in zip(labels, row, strict=True)},
                "top": [{"label": labels[j], "prob": float(row[j])} for j in order],
            }
        )
    # One image: its fields at the top level too, the common case for a form or a script.
    return {"model": m.name, "probability": out["probability"], "results": results, **results[0]}


def search(service, request: dict) -> dict:
    from urllib.parse import urlencode

    queries = _texts(request, "query", MAX_QUERIES)
    folder = request.get("folder") or (sorted(service.folders) or [None])[0]
    if folder not in service.folders:
        raise BadRequest(f"no indexed folder {folder!r}; start the app with --index FOLDER", 404)
    m = service.model(request.get("model"))
    out = service.submit("search", m.name, queries, folder=folder, top=_top(request, 12))
    answers = []
    for query, hits in zip(queries, out["results"], strict=True):
        answers.append(
            {
                "query": query,
                "results": [
                    {
                        "path": p,
                        "score": s,
                        "thumbnail": "/api/thumb?" + urlencode({"folder": folder, "path": p}),
                    }
                    for p, s in hits
                ],
            }
        )
    return {"model": m.name, "folder": folder, "images": out["images"], "queries": answers, **answers[0]}


def captions(service, request: dict) -> dict:
    pool = _texts(request, "captions", MAX_CAPTIONS, required=False) or service.caption_pool(MAX_CAPTIONS)
    if not pool:
        raise BadRequest('no "captions" given, and the indexed folders have none (.txt beside the images)')
    m, arrays = _decode(service, request.get("model"), request)
    rows = service.submit("captions", m.name, arrays, captions=pool, top=_top(request, 5))
    results = [{"captions": [{"caption": c, "score": s} for c, s in row]} for row in rows]
    return {"model": m.name, "results": results, **results[0]}


ROUTES = {
    "/v1/embeddings": embeddings,
    "/v1/classify": classify,
    "/v1/search": search,
    "/v1/captions": captions,
}
