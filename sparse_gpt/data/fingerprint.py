"""Content fingerprints of corpus files: what a built dataset and a saved data position are
keyed by, so that touching, copying or moving a corpus changes nothing and editing it does.

A file's fingerprint is the SHA-256 of its whole content. Hashing runs at ~1.4 GB/s here
(SHA-NI; 2-core CPU, 2026-12), which is small next to tokenising the same bytes, but would
still cost seconds per GB on every start; so each digest is cached by the file's absolute path
and ``(size, mtime_ns, ctime_ns, inode)`` in ``<data_dir>/source_digests.json``. An untouched
corpus is only ``stat``-ed; a touched, copied or moved one is read once more and then found in
the cache again.

Why not hash a few chunks plus the size (cheaper still)? Because an edit that keeps the size
(a fixed typo, two swapped lines) would pass unseen: the cached dataset would keep serving the
old tokens and a resumed run would silently continue on a stream that is not the file's.

The corpus fingerprint hashes every file's path relative to the corpus root and its digest:
the relative path is content here, because it names the documents (``rel/path:line``) and so
decides the train/validation split.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Sequence

CACHE_FILE = "source_digests.json"
_VERSION = 1


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime cannot be set by users: a rewrite that restores the old mtime still shows.
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _load(cache_path: str) -> dict[str, list]:
    try:
        with open(cache_path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _store(cache_path: str, files: dict[str, list]) -> None:
    """Writes the cache atomically (other processes may read or write it at the same time)."""
    folder = os.path.dirname(cache_path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".source_digests.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _VERSION, "files": files}, f)
        os.replace(tmp, cache_path)
    except OSError:
        pass  # the cache only saves time; the TFDS build reports an unwritable data_dir


def file_digests(paths: Sequence[str], cache_dir: str | None) -> list[str]:
    """SHA-256 hex digests of the files' contents, reusing cached ones of unchanged files.

    Args:
      paths: file paths.
      cache_dir: folder of the digest cache (the TFDS data dir); ``None``: no cache.

    Returns:
      One 64-character hex digest per path, in order.
    """
    cache_path = os.path.join(cache_dir, CACHE_FILE) if cache_dir else None
    cache = _load(cache_path) if cache_path else {}
    out, changed = [], False
    for path in paths:
        full = os.path.abspath(path)
        key = _stat_key(os.stat(full))
        hit = cache.get(full)
        if isinstance(hit, list) and len(hit) == 5 and hit[:4] == key:
            out.append(hit[4])
            continue
        with open(full, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        cache[full], changed = key + [digest], True
        out.append(digest)
    if cache_path and changed:
        _store(cache_path, cache)
    return out


def corpus_fingerprint(root: str, files: Sequence[str], cache_dir: str | None) -> dict:
    """The content fingerprint of the corpus files ``root/files``.

    Returns:
      ``{"digest": 16 hex chars over all files, "files": {relative path: 16 hex chars}}``;
      equal for equal contents and relative paths, whatever the root, mtimes or inodes.
    """
    digests = file_digests([os.path.join(root, f) for f in files], cache_dir)
    rels = [f.replace(os.sep, "/") for f in files]
    whole = hashlib.sha256(json.dumps(sorted(zip(rels, digests))).encode()).hexdigest()
    return {"digest": whole[:16], "files": {r: d[:16] for r, d in zip(rels, digests)}}


def describe_change(saved: dict[str, str], current: dict[str, str], limit: int = 3) -> str:
    """Names the files that differ between two ``corpus_fingerprint(...)["files"]`` maps."""
    changed = sorted(f for f in saved.keys() & current.keys() if saved[f] != current[f])
    parts = []
    for label, names in (("changed", changed), ("new", sorted(current.keys() - saved.keys())),
                         ("missing", sorted(saved.keys() - current.keys()))):
        if names:
            more = f" and {len(names) - limit} more" if len(names) > limit else ""
            parts.append(f"{label}: {', '.join(names[:limit])}{more}")
    return "; ".join(parts) or "the files differ"
