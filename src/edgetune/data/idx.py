"""Reader for IDX files, the format of MNIST, Fashion-MNIST and EMNIST (plain or gzip-compressed).

An IDX file is a 4-byte magic number ``0x00 0x00 <type code> <number of dims>``, the dims as big-endian
int32, then the values in C order. Images are ``0x00000803`` (uint8, 3-d ``(N, H, W)``), labels
``0x00000801`` (uint8, 1-d ``(N,)``). Every failure raises :class:`DataError` naming the file, what is
wrong with it and what to do.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from edgetune.core.errors import DataError

__all__ = ["read_idx", "read_idx_images", "read_idx_labels", "read_idx_pair", "write_idx"]

# IDX type code -> big-endian numpy dtype
_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES: dict[str, int] = {
    "uint8": 0x08,
    "int8": 0x09,
    "int16": 0x0B,
    "int32": 0x0C,
    "float32": 0x0D,
    "float64": 0x0E,
}
_FIX = "Download the file again (or reinstall the dataset package) and point data.path at its folder."


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic (whatever its name)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file {str(path)!r} does not exist. {_FIX}") from None
    except OSError as err:
        raise DataError(f"cannot read IDX file {str(path)!r}: {err}. Check its permissions.") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(
            f"IDX file {str(path)!r} is a damaged gzip archive ({err}); it was probably cut short while "
            f"downloading. {_FIX}"
        ) from None


def read_idx(path: str | Path, *, expect_magic: int | None = None, what: str = "IDX") -> np.ndarray:
    """Read one IDX file into an array of its declared dtype and shape (writable, native byte order).

    expect_magic: when given, the 4-byte magic number the file must carry (e.g. ``0x00000803``).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{what} file {str(path)!r} has only {len(raw)} bytes, too short to be IDX. {_FIX}")
    magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if expect_magic is not None and magic != expect_magic:
        raise DataError(
            f"{str(path)!r} is not an {what} file: its magic number is 0x{magic:08x}, expected "
            f"0x{expect_magic:08x}. The file is corrupt or is another file under this name (images and labels "
            f"swapped?). {_FIX}"
        )
    if raw[:2] != b"\x00\x00" or code not in _DTYPES or ndim == 0:
        raise DataError(
            f"{str(path)!r} is not an IDX file: magic number 0x{magic:08x} does not name a known type and "
            f"dimension count. {_FIX}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{what} file {str(path)!r} is truncated inside its header ({len(raw)} bytes). {_FIX}"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        kind = "truncated" if actual < expected else "longer than declared"
        raise DataError(
            f"{what} file {str(path)!r} is {kind}: its header declares shape {dims} ({expected} bytes of data) "
            f"but it holds {actual} bytes. {_FIX}"
        )
    # astype copies into a writable, native-byte-order array that torch.from_numpy takes without warning
    return np.frombuffer(raw, dtype=dtype, offset=header).astype(dtype.newbyteorder("=")).reshape(dims)


def read_idx_images(path: str | Path) -> np.ndarray:
    """Read an image file (magic ``0x00000803``): uint8 array ``(N, H, W)``."""
    return read_idx(path, expect_magic=0x00000803, what="IDX image")


def read_idx_labels(path: str | Path) -> np.ndarray:
    """Read a label file (magic ``0x00000801``): uint8 array ``(N,)``."""
    return read_idx(path, expect_magic=0x00000801, what="IDX label")


def read_idx_pair(images: str | Path, labels: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read matching image and label files: ``(N, H, W)`` uint8 and ``(N,)`` uint8, same ``N``."""
    x, y = read_idx_images(images), read_idx_labels(labels)
    if len(x) != len(y):
        raise DataError(
            f"IDX image file {str(images)!r} holds {len(x)} images but label file {str(labels)!r} holds "
            f"{len(y)} labels; the two files come from different datasets or splits (train vs t10k?). "
            f"Use the image and label files of the same split."
        )
    return x, y


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (gzip when ``compress`` or, by default, when the name ends in .gz)."""
    path = Path(path)
    arr = np.ascontiguousarray(array)
    if arr.dtype.name not in _CODES:
        raise DataError(f"cannot write dtype {arr.dtype} to IDX {str(path)!r}; use one of {sorted(_CODES)}")
    header = bytes([0, 0, _CODES[arr.dtype.name], arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=1, mtime=0)
    path.write_bytes(data)
    return path
