"""WebDataset tar shards: brace patterns and globs to shard paths, and a shard to indexed samples.

Captions: stripped; empty ones inside a list are dropped, an entry with no caption left
is bad ("empty_caption"); text that is not valid UTF-8 is bad ("caption_not_utf8", files
are read with `surrogateescape`, so one bad byte costs one caption, not the file); with
`max_caption_chars`, a longer caption is bad ("caption_too_long"), not truncated: 100 kB
of text in a caption field is a scraping or parsing accident, and its first words would
teach the model noise. An image keeps its other, good captions.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile

from .samples import TAR_IMAGE_EXTENSIONS, Collector, DataError, TarRef, lines


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


def shard_paths(source: str) -> list[str]:
    """Brace-expand, then glob; every pattern must match, every path must exist."""
    paths: list[str] = []
    for pattern in expand_braces(source):
        if glob.has_magic(pattern):
            found = sorted(glob.glob(pattern))
            if not found:
                raise DataError(f"{pattern}: no files match")
            paths.extend(found)
        elif not os.path.isfile(pattern):
            raise DataError(f"{pattern}: no such shard")
        else:
            paths.append(pattern)
    for p in paths:
        if not p.endswith(".tar"):
            raise DataError(f"{p}: not a .tar shard")
    return [os.path.abspath(p) for p in dict.fromkeys(paths)]  # de-duplicated, order kept


def read_tar(path: str, out: Collector) -> None:
    """Index one shard: group members by WebDataset key (path up to the basename's first dot).

    Member names only become keys and messages; nothing is extracted, so `../x` or `/x`
    names cannot write anywhere. A shard cut short keeps the members before the cut.
    """
    images: dict[str, tarfile.TarInfo] = {}
    texts: dict[str, list[str]] = {}  # a key's .txt members, in shard order
    problem, size = None, 0
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tf:  # plain tar only: offsets must be raw bytes
            for m in tf:
                if not m.isfile():
                    continue
                folder, _, basename = m.name.rpartition("/")
                stem, dot, ext = basename.partition(".")
                if not dot or stem.startswith("."):
                    continue
                key = f"{folder}/{stem}" if folder else stem
                ext = ext.lower()
                if ext in TAR_IMAGE_EXTENSIONS and key not in images:
                    images[key] = m
                elif ext == "txt":
                    text = tf.extractfile(m).read().decode("utf-8", errors="surrogateescape")
                    texts.setdefault(key, []).append(text)
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
    for key, m in list(images.items()):
        if m.offset_data + m.size > size:  # the shard ends inside this member
            ref = TarRef(path, m.offset_data, m.size, m.name)
            out.fail(DataError(f"{ref}: member cut short by the end of the shard", "truncated_tar", str(ref)))
            del images[key]
            texts.pop(key, None)
    for key in sorted(images.keys() - texts.keys()):
        m = images.pop(key)
        item = str(TarRef(path, m.offset_data, m.size, m.name))
        out.fail(DataError(f"{path}: sample '{key}' has an image but no {key}.txt", "unpaired", item))
    for key in sorted(texts.keys() - images.keys()):
        msg = f"{path}: sample '{key}' has {key}.txt but no image"
        out.fail(DataError(msg, "unpaired", f"{path}:{key}.txt"))
    for key, m in images.items():
        captions = [c for text in texts[key] for c in lines(text)]
        out.add(TarRef(path, m.offset_data, m.size, m.name), captions, f"{path}:{key}.txt")
