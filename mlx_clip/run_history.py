"""A run's OUT/metrics.jsonl read while it grows (framework-free): by the web app's runs page
(ui/runs.py) and by a sweep watching its trials (tuning/trial.py). training/logging.py writes the
file, one JSON object per line, and reads a finished one whole (read_history)."""

from __future__ import annotations

import json
from pathlib import Path


class History:
    """metrics.jsonl read incrementally: each refresh reads only what was appended since the
    last one, and a last line still being written (no newline yet) waits for the next refresh."""

    def __init__(self, path: Path):
        self.path, self.offset, self.records = path, 0, []
        self.key = None  # (inode, size at last read): a replaced or truncated file is re-read

    def refresh(self) -> list[dict]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self.offset, self.records, self.key = 0, [], None
            return self.records
        if self.key is not None and (st.st_ino != self.key[0] or st.st_size < self.key[1]):
            self.offset, self.records = 0, []
        if st.st_size > self.offset:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(st.st_size - self.offset)
            end = data.rfind(b"\n") + 1  # complete lines only
            for line in data[:end].split(b"\n"):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # a damaged line: the rest of the history is still shown
                    if isinstance(record, dict):
                        self.records.append(record)
            self.offset += end
        self.key = (st.st_ino, self.offset)
        return self.records
