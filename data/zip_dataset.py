"""Images in a zip archive, listed by a map file (``<path in zip>\\t<class index>`` per line)."""
from __future__ import annotations

import os
import zipfile
import zlib
from typing import Any, Callable

from torch.utils.data import Dataset

from config import UserError
from data.images import UnreadableImageError, decode_image_bytes

CACHE_MODES = ("no", "full", "part")


def read_map_file(map_path: str, names_in_zip: set[str]) -> list[tuple[str, int]]:
    """``(path inside the zip, class index)`` pairs; blank lines are skipped."""
    if not os.path.isfile(map_path):
        raise UserError(f"zip map file not found: {map_path}")
    samples = []
    with open(map_path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != 2 or not fields[0] or not fields[1].strip().isdigit():
                raise UserError(f"{map_path} line {line_number}: expected '<path in zip><TAB>"
                                f"<class index>', got {line.rstrip()!r}")
            inner_path = fields[0].lstrip("/")
            if inner_path not in names_in_zip:
                raise UserError(f"{map_path} line {line_number}: {inner_path} is not in the zip")
            samples.append((inner_path, int(fields[1])))
    if not samples:
        raise UserError(f"zip map file lists no images: {map_path}")
    return samples


class ZipImageDataset(Dataset):
    """Labelled images read from one zip archive with the standard ``zipfile`` module.

    Each process opens its own handle on first use (a handle must not cross a fork). Cache modes:
    ``no`` reads every image from the archive when asked; ``full`` reads all image bytes into
    memory at construction; ``part`` caches the images of this rank's shard
    (``index % world_size == rank``) and reads the others when asked.
    """

    def __init__(self, zip_path: str, map_path: str, transform: Callable, cache_mode: str = "no",
                 rank: int = 0, world_size: int = 1):
        if cache_mode not in CACHE_MODES:
            raise UserError(f"DATA.CACHE_MODE must be one of {', '.join(CACHE_MODES)}, "
                            f"got {cache_mode!r}")
        if not os.path.isfile(zip_path):
            raise UserError(f"zip file not found: {zip_path}")
        self.zip_path = zip_path
        self.transform = transform
        self._handle: zipfile.ZipFile | None = None
        self._handle_pid: int | None = None
        self.samples = read_map_file(map_path, set(self._zip().namelist()))
        self.targets = [label for _, label in self.samples]
        cached = {"no": range(0), "full": range(len(self.samples)),
                  "part": range(rank, len(self.samples), world_size)}[cache_mode]
        self._cache = {index: self._read(index) for index in cached}

    def _zip(self) -> zipfile.ZipFile:
        if self._handle_pid != os.getpid():
            try:
                self._handle = zipfile.ZipFile(self.zip_path)
            except (OSError, zipfile.BadZipFile) as err:
                raise UserError(f"cannot open zip file {self.zip_path}: {err}") from err
            self._handle_pid = os.getpid()
        return self._handle

    def _name(self, index: int) -> str:
        return f"{self.zip_path}@/{self.samples[index][0]}"

    def _read(self, index: int) -> bytes:
        try:
            return self._zip().read(self.samples[index][0])
        except (OSError, zipfile.BadZipFile, zlib.error) as err:  # e.g. a bad CRC
            raise UnreadableImageError.naming(self._name(index), err) from err

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = state["_handle_pid"] = None  # a spawned worker opens its own
        return state

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        data = self._cache[index] if index in self._cache else self._read(index)
        return self.transform(decode_image_bytes(data, self._name(index))), self.samples[index][1]
