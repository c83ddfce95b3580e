"""WebDataset tar shards: brace patterns and globs to shard paths, and a shard to indexed samples.

Captions: stripped; empty ones inside a list are dropped, an entry with no caption left
is bad ("empty_caption"); text that is not valid UTF-8 is bad ("caption_not_utf8", files
are read with `surrogateescape`, so one bad byte costs one caption, not the file); with
`max_caption_chars`, a longer caption is bad ("caption_too_long"), not truncated: 100 kB
of text in a caption field is a scraping or parsing accident, and its first words would
teach the model noise. An image keeps its other, good captions.

Keys follow WebDataset: a member's key is its path up to the first dot of its basename, the rest
is its field, so `photo.v2.png` is key `photo`, field `v2.png`. Only jpg/jpeg/png/webp and txt
fields are read; a member named like an image or caption with a dotted field (`photo.v2.png`,
`photo.en.txt`) is skipped as bad_member_name (other fields, .json or .cls, are ignored quietly).
img2dataset's shards: an image with no .txt takes the "caption" of its .json member; a folder given
as the source reads its *.tar files, not the _stats.json and .parquet index files beside them.
A key that holds two images in one shard is a duplicate_key: the first image and caption are
kept, the later ones are skipped and logged, never attached to the first.

`read_tar(..., text_field="cls")` pairs each image with its `.cls` member instead (CLIP_benchmark's
classification shards: the class index as text), read as a one-line caption by the same rules.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile

from .samples import TAR_IMAGE_EXTENSIONS, Collector, DataError, TarRef, decode_text, lines


def expand_braces(pattern: str) -> list[str]:
    """Expand `{a,b}` lists and `{000..009}` ranges (zero padding kept), nested or several."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise DataError(f"{pattern}: unbalanced '{{'")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    m = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if m:
        lo, hi = int(m[1]), int(m[2])
        width = len(m[1]) if m[1].startswith("0") else 0
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:  # split on top-level commas only, so nested braces survive to the recursion
        options, depth, last = [], 0, 0
        for i, ch in enumerate(body):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                options.append(body[last:i])
                last = i + 1
        options.append(body[last:])
    return [x for opt in options for x in expand_braces(head + opt + tail)]


def shard_paths(source: str, suffix: str = ".tar") -> list[str]:
    """Brace-expand, then glob; every pattern must match, every path must exist. A folder stands for
    its top-level `*suffix` files (img2dataset's output: the shards beside their _stats.json and
    .parquet index files, which are not read)."""
    paths: list[str] = []
    for pattern in expand_braces(source):
        if os.path.isdir(pattern):
            found = sorted(glob.glob(os.path.join(glob.escape(pattern), "*" + suffix)))
            if not found:
                raise DataError(f"{pattern}: no {suffix} files in this folder")
            paths.extend(found)
        elif glob.has_magic(pattern):
            found = sorted(glob.glob(pattern))
            if not found:
                raise DataError(f"{pattern}: no files match")
            paths.extend(found)
        elif not os.path.isfile(pattern):
            raise DataError(f"{pattern}: no such {'shard' if suffix == '.tar' else 'file'}")
        else:
            paths.append(pattern)
    for p in paths:
        if not p.endswith(suffix):
            raise DataError(f"{p}: not a {suffix} {'shard' if suffix == '.tar' else 'file'}")
    return [os.path.abspath(p) for p in dict.fromkeys(paths)]  # de-duplicated, order kept


def _key_field(name: str) -> tuple[str, str] | None:
    """WebDataset's split of a member name: (key, field), the key ending at the basename's first dot
    ("dir/photo.v2.png" -> ("dir/photo", "v2.png")); None for names with no field or hidden ones."""
    folder, _, basename = name.rpartition("/")
    stem, dot, field = basename.partition(".")
    if not dot or stem.startswith("."):
        return None
    return (f"{folder}/{stem}" if folder else stem), field.lower()


def _index(
    tf: tarfile.TarFile, path: str, out: Collector, images: dict, texts: dict, text_field: str, jsons: dict
) -> None:
    """Fill `images` (members by key) and `texts` ((.txt member, bytes) by key; .cls or another
    `text_field`), in shard order, as far as the shard reads, and `jsons` (.json member, bytes) for
    .txt shards; members named like an image or caption whose field is not one (photo.v2.png) are
    reported as bad_member_name."""
    for m in tf:
        split = _key_field(m.name) if m.isfile() else None
        if split is None:
            continue
        key, field = split
        if field in TAR_IMAGE_EXTENSIONS:
            images.setdefault(key, []).append(m)
        elif field == text_field:
            texts.setdefault(key, []).append((m, tf.extractfile(m).read()))
        elif field == "json" and text_field == "txt":
            jsons[key] = m, tf.extractfile(m).read()
        elif field.rpartition(".")[2] in (*TAR_IMAGE_EXTENSIONS, text_field):
            inner, _, ext = field.rpartition(".")  # "v2.png" -> "v2", "png"
            msg = (
                f"{path}:{m.name}: skipped: its WebDataset key is '{key}' and its field '{field}' (the key "
                f"ends at the first dot of the name), and only {', '.join(TAR_IMAGE_EXTENSIONS)} and "
                f"{text_field} fields are read; rename it without the inner dot: "
                f"{key}_{inner.replace('.', '_')}.{ext}"
            )
            out.fail(DataError(msg, "bad_member_name", f"{path}:{m.name}"))


def _drop_duplicates(path: str, images: dict, texts: dict, out: Collector) -> None:
    """One sample per key. A key with several images (a.jpg twice, or a.jpg and a.png) pairs the
    i-th image with the i-th .txt member in shard order; the first pair is kept, the others are
    reported as duplicate_key, so no caption ends up on another image. A key with one image keeps
    all its .txt members (their lines add up)."""
    for key, members in images.items():
        if len(members) == 1:
            continue
        captions = texts.get(key, [])
        for i, m in enumerate(members[1:], 1):
            with_text = f" and its caption {captions[i][0].name}" if i < len(captions) else ""
            msg = (
                f"{path}:{m.name}: skipped{with_text}: duplicate key '{key}' (the first is "
                f"{members[0].name}); WebDataset keys must be unique within a shard"
            )
            out.fail(DataError(msg, "duplicate_key", f"{path}:{m.name}"))
        for t, _ in captions[len(members) :]:
            msg = f"{path}:{t.name}: skipped: duplicate key '{key}' has more captions than images"
            out.fail(DataError(msg, "duplicate_key", f"{path}:{t.name}"))
        images[key] = members[:1]
        if captions:
            texts[key] = captions[:1]


def _json_captions(path: str, images: dict, texts: dict, jsons: dict, out: Collector) -> None:
    """An image with no .txt takes its .json member's "caption" (img2dataset writes both; a .txt wins)."""
    for key in images.keys() - texts.keys():
        if key not in jsons:
            continue
        m, data = jsons[key]
        try:
            caption = json.loads(decode_text(data, f"{path}:{m.name}")).get("caption")
        except (ValueError, AttributeError) as e:  # invalid JSON, not an object, UTF-16 (DataError)
            out.fail(
                DataError(f"{path}:{m.name}: cannot read its caption: {e}", "bad_row", f"{path}:{m.name}")
            )
            continue
        if isinstance(caption, str):
            one_line = " ".join(caption.splitlines())  # one caption, as it was written
            texts[key] = [(m, one_line.encode("utf-8", "surrogateescape"))]


def read_tar(path: str, out: Collector, text_field: str = "txt") -> None:
    """Index one shard: group members by WebDataset key (path up to the basename's first dot).

    Member names only become keys and messages; nothing is extracted, so `../x` or `/x`
    names cannot write anywhere. A shard cut short keeps the members before the cut.
    """
    images: dict[str, list[tarfile.TarInfo]] = {}
    texts: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {}  # a key's .txt members, in shard order
    jsons: dict[str, tuple[tarfile.TarInfo, bytes]] = {}  # img2dataset's metadata, with its "caption"
    problem, size = None, 0
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tf:  # plain tar only: offsets must be raw bytes
            _index(
                tf, path, out, images, texts, text_field, jsons
            )  # filled as far as it gets, if the shard is cut
            # tarfile ends quietly at EOF or at a garbled header; only the zero-block
            # end-of-archive marker says that nothing was lost.
            tf.fileobj.seek(tf.offset)
            block = tf.fileobj.read(tarfile.BLOCKSIZE)
            if not block:
                problem = "truncated_tar", "no end-of-archive marker (cut short?)"
            elif block.strip(b"\0"):
                problem = "bad_tar", f"unreadable header at byte {tf.offset}"
    except (tarfile.TarError, OSError) as e:
        problem = "truncated_tar" if "unexpected end" in str(e) else "bad_tar", str(e)
    if problem:
        kept = "; the complete members before the cut are kept" if out.skipped is not None and images else ""
        out.fail(DataError(f"{path}: cannot read tar shard: {problem[1]}{kept}", problem[0], path))
    _json_captions(path, images, texts, jsons, out)
    _drop_duplicates(path, images, texts, out)
    images = {key: members[0] for key, members in images.items()}
    for key, m in list(images.items()):
        if m.offset_data + m.size > size:  # the shard ends inside this member
            ref = TarRef(path, m.offset_data, m.size, m.name)
            out.fail(DataError(f"{ref}: member cut short by the end of the shard", "truncated_tar", str(ref)))
            del images[key]
            texts.pop(key, None)
    for key in sorted(images.keys() - texts.keys()):
        m = images.pop(key)
        item = str(TarRef(path, m.offset_data, m.size, m.name))
        out.fail(
            DataError(f"{path}: sample '{key}' has an image but no {key}.{text_field}", "unpaired", item)
        )
    for key in sorted(texts.keys() - images.keys()):
        msg = f"{path}: sample '{key}' has {key}.{text_field} but no image"
        out.fail(DataError(msg, "unpaired", f"{path}:{key}.{text_field}"))
    for key, m in images.items():
        ref = TarRef(path, m.offset_data, m.size, m.name)
        captions, undecodable = [], False
        for t, data in texts[key]:
            try:
                captions.extend(lines(decode_text(data, f"{path}:{t.name}")))
            except DataError as e:  # UTF-16 and the like: the whole member
                out.fail(DataError(str(e), "caption_not_utf8", str(ref)))
                undecodable = True
        if captions or not undecodable:
            out.add(ref, captions, f"{path}:{key}.{text_field}")
