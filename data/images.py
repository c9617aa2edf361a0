"""Decoding one image, and the error that stops a run when an image cannot be read."""
from __future__ import annotations

import io

from PIL import Image

from config import UserError


class UnreadableImageError(UserError):
    """An image file that cannot be decoded: the run stops and names the file.

    The message is always one line, ``cannot read image <path>: <reason>`` (``<path>`` is
    ``archive.zip@/inner/path`` for zip datasets). A DataLoader worker sends the exception to the
    main process, which re-creates it from one string holding the worker's whole traceback; the
    constructor picks the one-line message back out of that text, so ``str(err)`` is the same with
    and without workers and main.py can report it like any other ``UserError``.
    """

    def __init__(self, message: str):
        if "\n" in message:  # re-created by a DataLoader worker from the formatted traceback,
            final_line = message.rstrip().splitlines()[-1]  # whose last line is "Type: message"
            message = final_line.partition(": ")[2]
        super().__init__(message)

    @classmethod
    def naming(cls, name: str, err: BaseException) -> UnreadableImageError:
        """The error for image ``name`` (a path), with ``err`` squeezed onto one line as reason."""
        reason = " ".join(str(err).split()) or type(err).__name__
        return cls(f"cannot read image {name}: {reason}")


def _decode(source, name: str) -> Image.Image:
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    # PIL's ways of saying "bad image data" (a missing file is an OSError too)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError.naming(name, err) from err


def load_image_file(path: str) -> Image.Image:
    """An image file as RGB; ``UnreadableImageError`` when it cannot be opened or decoded."""
    return _decode(path, path)


def decode_image_bytes(data: bytes, name: str) -> Image.Image:
    """Encoded image bytes as RGB; ``name`` identifies them in ``UnreadableImageError``."""
    return _decode(io.BytesIO(data), name)
