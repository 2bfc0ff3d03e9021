"""The ``.qdz`` file: a zip holding ``manifest.json`` and raw little-endian arrays.

``manifest.json`` names the format and its version, the model (architecture, bits,
scheme, class names), the layer chain (versions 1, 2) or node graph (version 3) the engine runs, and for every array its member
file, dtype, shape and sha256. Reading checks, in this order and before anything is
run: the zip and its CRCs, the manifest, the format version (a newer one is refused),
then each array's size and sha256. Numpy only: no torch here.

Weight codes are stored as bit-planes packed 8 per byte along the input channels
(`pack_codes`): plane ``j`` holds bit ``j`` of every code, so a k-bit weight costs k bits.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from ..errors import UserError

FORMAT = "qdistill-qdz"
FORMAT_VERSION = 3  # the newest this reads; 2 adds avgpool's in_step, 3 the node graph (see `format_version`)
MANIFEST = "manifest.json"
# dtypes an array may have; anything else in a manifest is refused, never interpreted.
DTYPES = ("uint8", "int8", "int32", "float32", "float64")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so the same model always gives the same bytes


class QdzError(UserError):
    """A ``.qdz`` file is missing, corrupt, tampered with, or from a newer format."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _le(a: np.ndarray) -> np.ndarray:
    """The array in little-endian byte order, C-contiguous (the on-disk layout)."""
    a = np.ascontiguousarray(a)
    return a.astype(a.dtype.newbyteorder("<"), copy=False)


def format_version(layers) -> int:
    """The oldest format version that runs the chain ``layers``: 2 where an ``avgpool`` has
    ``in_step`` (levels of an LSQ quantizer, which a version-1 reader would silently
    scale as ``level / (2**a - 1)``), else 1, so older readers still run every other file.
    A manifest of ``"nodes"`` (a graph: residual networks) is version 3 (`build`)."""
    return 2 if any(isinstance(layer, dict) and "in_step" in layer for layer in layers) else 1


def build(manifest: dict, arrays: dict[str, np.ndarray]) -> tuple[bytes, dict]:
    """The bytes of a ``.qdz`` file and its full manifest: ``manifest`` gains ``format``,
    ``format_version`` (`format_version`) and an ``arrays`` table (member, dtype, shape, sha256 of each
    array's raw bytes). ``manifest`` must be JSON-serialisable."""
    table = {}
    members = []
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.name not in DTYPES:
            raise ValueError(f"array {name}: dtype {a.dtype} not storable in a .qdz")
        raw = _le(a).tobytes()
        member = f"arrays/{name}.bin"
        table[name] = {"file": member, "dtype": a.dtype.name, "shape": list(a.shape),
                       "sha256": sha256(raw)}
        members.append((member, raw))
    version = 3 if "nodes" in manifest else format_version(manifest.get("layers", []))
    full = {"format": FORMAT, "format_version": version, **manifest,
            "arrays": table}
    text = json.dumps(full, indent=1, sort_keys=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        def put(member, data):
            info = zipfile.ZipInfo(member, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
        put(MANIFEST, text.encode())
        for member, raw in members:
            put(member, raw)
    return buf.getvalue(), json.loads(text)


def read(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read and verify a ``.qdz`` file; returns ``(manifest, arrays)``.

    Raises `QdzError` (one line) on a missing file, a bad zip or CRC, a missing or
    unreadable manifest, a foreign or newer format, or an array whose size or sha256
    does not match the manifest.
    """
    path = Path(path)
    if path.is_dir():
        raise QdzError(f"{path} is a folder (a run directory?), not an exported model: run "
                       f"`qdistill export {path} --out model.qdz` first")
    if not path.is_file():
        raise QdzError(f"model file not found: {path}")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise QdzError(f"{path} is not a .qdz model file (bad zip: {e})") from None
    with zf:
        if MANIFEST not in zf.namelist() and any(n.endswith("data.pkl") for n in zf.namelist()):
            raise QdzError(f"{path} is a PyTorch checkpoint, not an exported model: run `qdistill export RUN "
                           f"--out model.qdz` on its run directory first")
        manifest = _read_manifest(zf, path)
        arrays = {}
        table = manifest.get("arrays")
        if not isinstance(table, dict):
            raise QdzError(f"{path}: manifest has no arrays table")
        for name, spec in table.items():
            arrays[name] = _read_array(zf, path, name, spec)
    return manifest, arrays


def _member(zf: zipfile.ZipFile, path: Path, member: str, expect_size: int | None = None) -> bytes:
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise QdzError(f"{path}: missing member {member}") from None
    if expect_size is not None and info.file_size != expect_size:
        raise QdzError(f"{path}: {member} holds {info.file_size} bytes, the manifest says {expect_size}")
    try:
        return zf.read(info)  # checks the CRC-32
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise QdzError(f"{path}: {member} is corrupt ({e})") from None
    except Exception as e:  # zlib.error on a damaged deflate stream
        raise QdzError(f"{path}: {member} is corrupt ({type(e).__name__}: {e})") from None


def _read_manifest(zf: zipfile.ZipFile, path: Path) -> dict:
    raw = _member(zf, path, MANIFEST)
    try:
        manifest = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QdzError(f"{path}: manifest.json is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise QdzError(f"{path}: not a qdistill model (manifest format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise QdzError(f"{path}: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise QdzError(f"{path} uses .qdz format version {version}, newer than the {FORMAT_VERSION} "
                       "this qdistill reads; upgrade qdistill")
    return manifest


def _read_array(zf: zipfile.ZipFile, path: Path, name: str, spec) -> np.ndarray:
    try:
        member, dtype, shape, digest = spec["file"], spec["dtype"], spec["shape"], spec["sha256"]
        if dtype not in DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError
        dt = np.dtype(dtype).newbyteorder("<")
        size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    except (KeyError, TypeError, ValueError):
        raise QdzError(f"{path}: manifest entry of array {name!r} is malformed") from None
    raw = _member(zf, path, member, size)
    if sha256(raw) != digest:
        raise QdzError(f"{path}: checksum mismatch in array {name!r}; the file was modified or damaged")
    return np.frombuffer(raw, dtype=dt).reshape(shape).astype(dt.newbyteorder("="))


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Bit-planes of integer codes ``(O, C, KH, KW)`` in ``0..2**bits-1``, packed 8 per
    byte along the input channels: ``uint8 (bits, O, KH, KW, ceil(C/8))``, where bit
    ``c % 8`` of byte ``c // 8`` in plane ``j`` is bit ``j`` of code ``[o, c, y, x]``."""
    codes = np.asarray(codes)
    if codes.min(initial=0) < 0 or codes.max(initial=0) >= 2**bits:
        raise ValueError(f"codes out of range for {bits} bits")
    planes = (codes[None].astype(np.uint8) >> np.arange(bits, dtype=np.uint8)[:, None, None, None, None]) & 1
    return np.packbits(planes.transpose(0, 1, 3, 4, 2), axis=-1, bitorder="little")


def unpack_codes(planes: np.ndarray, in_channels: int) -> np.ndarray:
    """Inverse of `pack_codes`: integer codes ``(O, C, KH, KW)``."""
    bits = np.unpackbits(planes, axis=-1, count=in_channels, bitorder="little")
    weights = (1 << np.arange(planes.shape[0], dtype=np.int64))[:, None, None, None, None]
    return (bits.astype(np.int64) * weights).sum(0).transpose(0, 3, 1, 2)
