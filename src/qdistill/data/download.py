"""Resumable, md5-checked downloads.

Bytes go to ``NAME.part``; a later call continues it with an HTTP ``Range`` request. Only
a file whose md5 matches is renamed to ``NAME``, so ``NAME`` is always complete and right.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..errors import DataError

CHUNK = 1 << 20


def md5_file(path: str | Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-", value or "")
    return int(m.group(1)) if m else None


def _transfer(url: str, part: Path, have: int, timeout: float, hint: str, desc: str) -> int:
    """Append the bytes after ``have`` to ``part``, or rewrite it when the server ignores
    the Range request. Returns how many bytes of the old part were kept."""
    headers = {"User-Agent": "qdistill"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after `have`: the part may be whole; md5 decides
            return have
        raise DataError(f"cannot download {url}: HTTP {e.code} {e.reason}; {hint}") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        reason = " ".join(str(getattr(e, "reason", e)).split())
        raise DataError(f"cannot download {url} ({reason}); {hint}") from None
    with resp:
        if not (have and resp.status == 206 and _content_range_start(resp.headers.get("Content-Range")) == have):
            have = 0  # a 200 carries the whole file
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        try:
            with open(part, "ab" if have else "wb") as f, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=desc, disable=None, leave=False) as bar:
                while block := resp.read(CHUNK):
                    f.write(block)
                    bar.update(len(block))
        except (OSError, http.client.HTTPException) as e:
            raise DataError(f"download of {url} interrupted ({type(e).__name__}: {' '.join(str(e).split())}); "
                            f"run again to resume from {part}") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise DataError(f"download of {url} stopped at {size} of {total} bytes; run again to resume from {part}")
    return have


def fetch(url: str, dest: str | Path, md5: str, *, timeout: float = 60.0) -> None:
    """Download ``url`` to ``dest`` unless a resumable ``dest.part`` already holds part of
    it; rename to ``dest`` once the md5 of the whole file equals ``md5``.

    Raises `DataError` (one line naming the URL and where to place the file by hand) when
    the server cannot be reached, answers an error, or sends bytes with the wrong md5.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    hint = f"download it yourself and place it at {dest}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the folder {dest.parent} for {dest.name}: {e.strerror}") from None
    for _ in range(2):
        have = part.stat().st_size if part.is_file() else 0
        kept = _transfer(url, part, have, timeout, hint, dest.name)
        got = md5_file(part)
        if got == md5:
            os.replace(part, dest)
            return
        part.unlink(missing_ok=True)
        if not kept:
            break
        # the old part held bytes of another file (or garbage): start over once
    raise DataError(f"downloaded {dest.name} has md5 {got}, expected {md5}; deleted it. "
                    f"Try again, or {hint}")
