"""Models to merge, read one tensor at a time: :class:`TensorSource` and :func:`open_source`.

A source is a model whose tensor names, shapes and dtypes are known from the file headers alone, and whose
tensors are read only when asked for, one at a time, so a merge can stream models larger than memory (as
mergekit's lazy loader does). Files are checked by ``safetensors.safe_open`` when opened; each tensor is then
read at its offset into a new tensor that is freed when dropped (see :class:`_SafetensorsFile` for why not
through ``safe_open``'s memory map). :func:`open_source` takes:

- a ``.safetensors`` file;
- a Hugging Face folder: ``model.safetensors``, or shards ``model-0000x-of-0000y.safetensors`` listed by
  ``model.safetensors.index.json``;
- an edgetune run folder: its ``model.safetensors``; for a staged run (``RUN/stages/NAME/``) the last stage of
  the finished run, or the stage folder given (``RUN/stages/NAME``), as ``model.from: RUN_DIR`` reads it;
- an in-memory state dict (or a module, whose ``state_dict()`` is taken).

:func:`check_compatible` compares names and shapes of several sources from their headers, before any tensor
is read. Only safetensors is read: a pickle (``.bin``, ``.pt``) can run code when loaded and cannot be read one
tensor at a time, so it is refused with the command that converts it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from edgetune.core.errors import CheckpointError, ConfigError, did_you_mean
from edgetune.core.runs import final_stage_folder

__all__ = ["SAFETENSORS_DTYPES", "SourceSpec", "TensorInfo", "TensorSource", "check_compatible", "open_source",
           "read_state_dict"]

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_SHOW = 5  # names listed per kind of mismatch


def _dtype_table() -> dict[str, torch.dtype]:
    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
             "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
    return {code: getattr(torch, name) for code, name in names.items() if hasattr(torch, name)}


#: safetensors dtype code -> torch dtype (those this torch version has)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = _dtype_table()


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor: shape, dtype and size in bytes."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


class TensorSource:
    """A model whose tensors are read one at a time; names, shapes and dtypes come from the headers.

    Build one with :func:`open_source`. ``keys()`` is in storage order (file order, shard by shard; insertion
    order for a state dict). Use it as a context manager, or call :meth:`close`, to release the files.
    """

    def __init__(self, name: str, infos: dict[str, TensorInfo], fetch: Callable[[str], Tensor],
                 metadata: Mapping[str, str] | None = None, files: Sequence[Path] = (),
                 on_close: Callable[[], None] | None = None) -> None:
        self.name = name
        self.files = tuple(files)
        self._infos = infos
        self._fetch = fetch
        self._metadata = dict(metadata or {})
        self._on_close = on_close
        self._closed = False

    # ------------------------------------------------------------------ header-only queries
    def keys(self) -> list[str]:
        """Tensor names, in storage order."""
        return list(self._infos)

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise KeyError(f"{self.name} has no tensor {key!r}.{did_you_mean(key, self._infos)}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self.info(key).dtype

    @property
    def metadata(self) -> dict[str, str]:
        """The file's safetensors metadata (the first shard's for a sharded folder; empty for a state dict)."""
        return dict(self._metadata)

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors (what reading every tensor once reads)."""
        return sum(i.nbytes for i in self._infos.values())

    # ------------------------------------------------------------------ reading
    def get(self, key: str) -> Tensor:
        """Read one tensor (on CPU for files); nothing else is read."""
        if self._closed:
            raise ValueError(f"{self.name} was closed; open it again with open_source()")
        self.info(key)
        return self._fetch(key)

    def close(self) -> None:
        if not self._closed and self._on_close is not None:
            self._on_close()
        self._closed = True

    def __enter__(self) -> TensorSource:  # noqa: PYI034 (no typing.Self before Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorSource({self.name!r}, {len(self)} tensors, {self.nbytes / 2**20:.1f} MiB)"


#: what :func:`open_source` accepts
SourceSpec = str | os.PathLike | Mapping[str, Tensor] | nn.Module | TensorSource


# ---------------------------------------------------------------------------------------- files
def _pickle_error(path: Path, folder: Path | None = None) -> CheckpointError:
    where = f"{folder} holds {path.name}, a PyTorch pickle checkpoint" if folder else (
        f"{path} is a PyTorch pickle checkpoint")
    return CheckpointError(
        f"{where}; merging reads only safetensors (a pickle can run code when loaded and cannot be read one "
        "tensor at a time). Convert it once, from a Python session you trust: python -c \"import torch; "
        "from safetensors.torch import save_file; sd = torch.load('IN.bin', map_location='cpu', "
        "weights_only=True); save_file({k: v.contiguous().clone() for k, v in sd.items()}, 'OUT.safetensors')\""
        "; for a Hugging Face folder, AutoModel.from_pretrained(DIR).save_pretrained(DIR) writes "
        "model.safetensors."
    )


def _looks_like_pickle(path: Path) -> bool:
    """Torch zip archives start with ``PK\\x03\\x04``, legacy torch/pickle files with protocol byte 0x80."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _read_header(fh: BinaryIO) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file that ``safe_open`` has already accepted, and where its data starts."""
    fh.seek(0)
    n = int.from_bytes(fh.read(8), "little")
    return json.loads(fh.read(n)), 8 + n


class _SafetensorsFile:
    """One safetensors file: its tensor infos in file order, and reads of one tensor into fresh memory.

    ``safe_open`` checks the file when it is opened (header, offsets, size). Tensors are then read at their
    offset into a new tensor, not through ``safe_open``'s memory map: the tensors it returns (safetensors 0.8) are
    views of a private map of the whole file, so every page read stays in this process's resident memory until
    the file is closed (a merge would grow to the size of its inputs), and an in-place change to one is seen by
    the next read of that name.
    """

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        fh = None
        try:
            with safe_open(str(path), framework="pt", device="cpu"):
                pass
            fh = path.open("rb", buffering=0)
            header, self._start = _read_header(fh)
        except Exception as err:  # noqa: BLE001  (safetensors raises its own SafetensorError; also OSError)
            if fh is not None:
                fh.close()
            if path.suffix.lower() in _PICKLE_SUFFIXES or _looks_like_pickle(path):
                raise _pickle_error(path) from None
            if path.suffix == ".safetensors":
                raise CheckpointError(
                    f"{path} is not a readable safetensors file (truncated or corrupt: {err}); copy or download "
                    "it again, or re-export it with safetensors.torch.save_file"
                ) from None
            raise CheckpointError(
                f"{path} is not a safetensors file ({err}); merging reads .safetensors files, Hugging Face "
                "folders and edgetune run folders"
            ) from None
        self._fh: BinaryIO | None = fh
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        self.infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, int] = {}
        for key, entry in entries:
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                fh.close()
                raise CheckpointError(f"{path}: tensor {key!r} has dtype {entry['dtype']}, which this torch "
                                      f"{torch.__version__} cannot hold; upgrade torch or convert the file")
            begin, end = (int(x) for x in entry["data_offsets"])
            self.infos[key] = TensorInfo(tuple(int(s) for s in entry["shape"]), dtype, end - begin)
            self._offsets[key] = self._start + begin

    def get(self, key: str) -> Tensor:
        info = self.infos[key]
        out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes == 0:
            return out
        assert self._fh is not None
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # (nbytes,) view of out's storage
        self._fh.seek(self._offsets[key])
        done = 0
        while done < info.nbytes:  # a read may return less than asked (Linux caps one read near 2 GiB)
            n = self._fh.readinto(buf[done:])
            if not n:
                raise CheckpointError(f"{self.path} ended inside tensor {key!r} (it was cut or rewritten after it "
                                      "was opened); copy it again")
            done += n
        return out

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _file_source(path: Path) -> TensorSource:
    f = _SafetensorsFile(path)
    return TensorSource(str(path), f.infos, f.get, f.metadata, files=[path], on_close=f.close)


def _sharded_source(folder: Path, index_path: Path) -> TensorSource:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path} is not a valid safetensors index ({type(err).__name__}: {err}); it "
                              "must hold {\"weight_map\": {tensor name: shard file}}; copy the folder again") from None
    shard_names = sorted(set(weight_map.values()))
    missing = [s for s in shard_names if not (folder / s).is_file()]
    if missing:
        raise CheckpointError(f"{index_path} lists shard(s) missing from {folder}: {', '.join(missing[:_SHOW])}; "
                              "the download or copy is incomplete: fetch the whole folder again")
    shards: dict[str, _SafetensorsFile] = {}
    try:
        for s in shard_names:
            shards[s] = _SafetensorsFile(folder / s)
        infos: dict[str, TensorInfo] = {}
        owner: dict[str, _SafetensorsFile] = {}
        for s in shard_names:  # shard by shard, each in file order
            for key, info in shards[s].infos.items():
                if weight_map.get(key) == s:
                    infos[key], owner[key] = info, shards[s]
        absent = [k for k in weight_map if k not in infos]
        if absent:
            raise CheckpointError(f"{index_path} maps {len(absent)} tensor(s) to shards that lack them, e.g. "
                                  f"{absent[0]!r} in {weight_map[absent[0]]}; the shards and the index belong to "
                                  "different saves: copy the folder again")
    except BaseException:
        for f in shards.values():
            f.close()
        raise

    def close() -> None:
        for f in shards.values():
            f.close()

    return TensorSource(str(folder), infos, lambda key: owner[key].get(key), shards[shard_names[0]].metadata,
                        files=[folder / s for s in shard_names], on_close=close)


# ---------------------------------------------------------------------------------------- folders
def _listing(folder: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "it is empty"
    return "it holds " + ", ".join(names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _folder_source(folder: Path) -> TensorSource:
    if (folder / WEIGHTS).is_file():
        return _file_source(folder / WEIGHTS)
    if (folder / INDEX).is_file():
        return _sharded_source(folder, folder / INDEX)
    if (folder / "stages").is_dir():
        return _folder_source(final_stage_folder(folder, "merge"))
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _sharded_source(folder, indexes[0])
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES and p.is_file())
    if pickles and not list(folder.glob("*.safetensors")):
        raise _pickle_error(pickles[0], folder)
    if (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
        raise ConfigError(f"{folder} is an edgetune run folder that did not finish (no {WEIGHTS} yet); finish it "
                          f"with `edgetune run --resume {folder}`, then merge it")
    hint = ""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        hint = f" To merge one of its safetensors files, give the file itself (e.g. {files[0]})."
    raise ConfigError(
        f"{folder} holds no model weights to merge: no {WEIGHTS}, no {INDEX} with its shards, no run stages "
        f"({_listing(folder)}). Give a .safetensors file, a Hugging Face folder or an edgetune run folder.{hint}"
    )


def _memory_source(state: Mapping[str, Any], name: str) -> TensorSource:
    bad = [(k, type(v).__name__) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ConfigError(f"a state dict to merge must map names to tensors; {bad[0][0]!r} holds a {bad[0][1]}")
    if "__metadata__" in state:
        raise ConfigError("a state dict to merge has a tensor named '__metadata__', a name safetensors reserves; "
                          "rename it")
    tensors = dict(state)
    infos = {k: TensorInfo(tuple(v.shape), v.dtype, v.numel() * v.element_size()) for k, v in tensors.items()}
    return TensorSource(name, infos, tensors.__getitem__)


def open_source(spec: SourceSpec) -> TensorSource:
    """Open a model to merge, lazily: a ``.safetensors`` file, a Hugging Face folder (single file or sharded),
    an edgetune run folder (``RUN`` or ``RUN/stages/NAME``), a state dict or a module; a source is returned as
    it is.

    Raises :class:`ConfigError` for a missing path or a folder without weights, :class:`CheckpointError` for a
    file that is not readable safetensors (truncated, corrupt, a pickle checkpoint), each naming the file and
    what to do.
    """
    if isinstance(spec, TensorSource):
        return spec
    if isinstance(spec, nn.Module):
        return _memory_source(spec.state_dict(), f"state dict of {type(spec).__name__}")
    if isinstance(spec, Mapping):
        return _memory_source(spec, "state dict")
    if not isinstance(spec, (str, os.PathLike)):
        raise ConfigError(f"cannot merge a {type(spec).__name__}; give a .safetensors file, a Hugging Face folder, "
                          "an edgetune run folder or a state dict")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder_source(path)
    if path.is_file() and path.name.endswith(".safetensors.index.json"):
        return _sharded_source(path.parent, path)
    if path.is_file():
        return _file_source(path)
    parent = next((p for p in path.parents if p.is_dir()), None)
    near = ""
    if parent is not None and parent != path.parent:
        near = f" ({parent} exists, {path.relative_to(parent).parts[0]!r} does not)"
    elif parent is not None:
        near = did_you_mean(path.name, [p.name for p in parent.iterdir()])
    raise ConfigError(f"model to merge {path} does not exist{near}. Give a .safetensors file, a Hugging Face folder "
                      "or an edgetune run folder; relative paths start at the working directory.")


# ---------------------------------------------------------------------------------------- compatibility
def _names(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f" (and {len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def read_state_dict(spec: SourceSpec) -> dict[str, Tensor]:
    """Every tensor of a model (anything :func:`open_source` takes), read at once: for the merges that need whole
    models in memory (re-basin, the merge stage's inputs)."""
    with open_source(spec) as src:
        return {k: src.get(k) for k in src}


def check_compatible(sources: Sequence[TensorSource], base: TensorSource | None = None) -> None:
    """Check that ``sources`` (and ``base``) hold the same tensor names with the same shapes, from the headers
    alone (no tensor is read). Dtypes may differ. Raises :class:`ConfigError` (as the in-memory check of
    :func:`edgetune.merging.merge_state_dicts` does) naming the first mismatches:
    tensors missing or extra per model, and shape differences."""
    if not sources:
        raise ConfigError("nothing to merge: give at least one model")
    ref = sources[0]
    others = [(f"model {i} ({s.name})", s) for i, s in enumerate(sources[1:], start=1)]
    if base is not None:
        others.append((f"the base ({base.name})", base))
    ref_keys = ref.keys()
    problems: list[str] = []
    for label, src in others:
        mine = set(src.keys())
        missing = [k for k in ref_keys if k not in mine]
        extra = [k for k in src if k not in ref]
        if missing:
            problems.append(f"{label} lacks {len(missing)} tensor(s) of model 0: {_names(missing)}")
        if extra:
            problems.append(f"{label} has {len(extra)} tensor(s) model 0 lacks: {_names(extra)}")
        shapes = [k for k in ref_keys if k in mine and src.shape(k) != ref.shape(k)]
        for k in shapes[:_SHOW]:
            problems.append(f"{k!r} is {tuple(ref.shape(k))} in model 0 but {tuple(src.shape(k))} in {label}")
        if len(shapes) > _SHOW:
            problems.append(f"... and {len(shapes) - _SHOW} more shape difference(s) in {label}")
    if problems:
        raise ConfigError(
            f"the models to merge do not match (model 0 is {ref.name}; compared by tensor name and shape): "
            + "; ".join(problems)
            + ". Merge only fine-tunes of one architecture (the same base model, same heads and adapters)."
        )
