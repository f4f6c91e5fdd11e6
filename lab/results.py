"""One result shape for every technique: images, the settings that made them, tensors, save and load.

    run = lab.daam.trace_generation(pipe, "a red circle")   # an AttributionRun, a lab.results.Result
    run.save("runs/circle")                                 # result.json-style metadata + safetensors
    run = lab.daam.AttributionRun.load("runs/circle")

A technique's result subclasses `Result`, names its format and version, and says how it becomes a record
(`to_record() -> (metadata dict, tensors dict)`) and back (`from_record(metadata, tensors, **kwargs)`).
`save` writes the tensors as safetensors (never pickle) and the metadata as JSON with the format, its
version and the sdlab version that wrote it. `load` refuses, with an error that says what is wrong and
what to do, a folder that is missing, holds another result, was written by a newer format, or whose
files are corrupted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

__all__ = ["Result", "ResultFormatError", "as_uint8_images"]


class ResultFormatError(ValueError):
    """A folder that cannot be read as the result asked for."""


class Result:
    """Base of every technique's result. Subclasses set FORMAT and VERSION and implement the record."""

    FORMAT: ClassVar[str] = "sdlab.Result"
    VERSION: ClassVar[int] = 1
    METADATA_FILE: ClassVar[str] = "result.json"
    TENSORS_FILE: ClassVar[str] = "tensors.safetensors"

    image_arrays: np.ndarray | None = None  # uint8 (n, height, width, 3); `images` gives them as PIL
    settings: dict

    # -- what a subclass provides ---------------------------------------------------------------

    def to_record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON-able metadata, {name: tensor}); the images are added by save()."""
        raise NotImplementedError

    @classmethod
    def from_record(cls, metadata: dict[str, Any], tensors: dict[str, torch.Tensor], images, **kwargs) -> "Result":
        """The result from what save() wrote; `images` is the uint8 array or None."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------

    @property
    def images(self) -> list[Image.Image]:
        if self.image_arrays is None:
            raise ValueError(f"this {type(self).__name__} holds no images")
        return [Image.fromarray(array) for array in self.image_arrays]

    def save(self, folder: str | Path) -> Path:
        """Write the result to `folder` (created if needed): metadata JSON and one safetensors file."""
        from safetensors.torch import save_file

        import lab

        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder} is a file: save a result to a folder")
        folder.mkdir(parents=True, exist_ok=True)
        metadata, tensors = self.to_record()
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        if self.image_arrays is not None:
            tensors["images"] = torch.from_numpy(np.ascontiguousarray(self.image_arrays))
        save_file(tensors, str(folder / self.TENSORS_FILE))
        header = {"format": self.FORMAT, "version": self.VERSION, "sdlab_version": lab.__version__}
        (folder / self.METADATA_FILE).write_text(json.dumps({**header, **metadata}, indent=1))
        return folder

    @classmethod
    def read_metadata(cls, folder: str | Path) -> dict[str, Any]:
        """The folder's metadata, checked to be this result's format and a version this code reads."""
        folder = Path(folder)
        path = folder / cls.METADATA_FILE
        what = f"an sdlab {cls.__name__} (saved by {cls.__name__}.save)"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder: give the folder {cls.__name__}.save wrote")
        if not path.is_file():
            raise ResultFormatError(f"{folder} is not {what}: it has no {cls.METADATA_FILE}")
        try:
            metadata = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ResultFormatError(
                f"{path} is corrupted ({error}): it is not the JSON that "
                f"{cls.__name__}.save writes; save the result again"
            ) from None
        if not isinstance(metadata, dict) or metadata.get("format") != cls.FORMAT:
            found = metadata.get("format") if isinstance(metadata, dict) else None
            raise ResultFormatError(f"{folder} is not {what}" + (f": it holds {found!r}" if found else ""))
        version = metadata.get("version")
        if not isinstance(version, int) or version > cls.VERSION:
            raise ResultFormatError(
                f"{folder} was saved in {cls.FORMAT} format version {version!r}; this sdlab "
                f"reads versions up to {cls.VERSION}: update sdlab"
            )
        return metadata

    @classmethod
    def read_tensors(cls, folder: str | Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = Path(folder) / cls.TENSORS_FILE
        if not path.is_file():
            raise ResultFormatError(f"{folder} is incomplete: {cls.TENSORS_FILE} is missing")
        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for truncated or foreign files
            raise ResultFormatError(
                f"{path} is corrupted or not a safetensors file ({error}); save the result again"
            ) from None

    @classmethod
    def load(cls, folder: str | Path, **kwargs) -> "Result":
        """Read a result written by save(); keyword arguments go to from_record (e.g. pipe=)."""
        metadata = cls.read_metadata(folder)
        tensors = cls.read_tensors(folder)
        images = tensors.pop("images", None)
        try:
            return cls.from_record(metadata, tensors, images.numpy() if images is not None else None, **kwargs)
        except (KeyError, TypeError) as error:
            raise ResultFormatError(f"{folder} is incomplete or corrupted: {error!r} is missing or wrong") from None


def as_uint8_images(images) -> np.ndarray | None:
    """PIL images, uint8 arrays or float arrays in [0, 1] -> uint8 (n, height, width, 3); None stays None.

    Latents (a torch tensor, output_type="latent") are not images: None.
    """
    if images is None or isinstance(images, torch.Tensor):
        return None
    arrays = []
    for image in images:
        array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        arrays.append(array[..., :3])
    return np.stack(arrays)
