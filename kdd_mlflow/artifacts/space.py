"""The input space of images: a dataset's normalisation and, when used, a ZCA whitening fitted once.

Experts fit the whitening on their training split and store the matrix; the distilled set, and every
model trained in that run's space, carry the same matrix, so all arms of a ZCA study see the same
inputs. Two spaces agree when their datasets match and their matrices are equal (to float32 rounding,
so a matrix fitted again on another machine still agrees), never merely because both "use ZCA".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from kdd_mlflow import data, tracking

# Whitening matrices fitted on the same images by different BLAS builds differ in the last bits.
MATRIX_TOLERANCE = 1e-4


@dataclass
class InputSpace:
    """Where a model's inputs live: ``dataset``'s normalisation, then ``zca`` when it is not None."""

    dataset: str
    zca: data.ZCA | None = None

    @property
    def info(self) -> data.DatasetInfo:
        return data.info(self.dataset)

    @property
    def digest(self) -> str:
        """A short fingerprint of the whitening ("none" without): shown in specs, params and errors."""
        if self.zca is None:
            return "none"
        h = hashlib.sha256()
        for t in (self.zca.mean, self.zca.matrix):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def describe(self) -> str:
        return f"{self.dataset}, {'ZCA ' + self.digest if self.zca is not None else 'no ZCA'}"

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images mapped into this space."""
        return self.zca(images) if self.zca is not None else images

    def enter(self, real: data.RealData) -> data.RealData:
        """Map every split of ``real`` into this space, in place; returns ``real``."""
        if real.info.name != self.dataset:
            raise ValueError(f"input space is for {self.dataset}, data is {real.info.name}")
        for split in (real.train, real.val, real.test):
            split.images = self.apply(split.images)
        return real

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images of this space back in [0, 1] pixel space, for viewing."""
        if self.zca is not None:
            images = self.zca.inverse(images)
        return data.denormalise(images, self.info)

    def agrees_with(self, other: InputSpace) -> bool:
        if self.dataset != other.dataset or (self.zca is None) != (other.zca is None):
            return False
        if self.zca is None:
            return True
        return all(torch.allclose(a, b, rtol=MATRIX_TOLERANCE, atol=MATRIX_TOLERANCE)
                   for a, b in ((self.zca.mean, other.zca.mean), (self.zca.matrix, other.zca.matrix)))

    def require(self, other: InputSpace, this_is: str, other_is: str) -> None:
        """Refuse, naming both, when ``other`` is a different space."""
        if not self.agrees_with(other):
            raise tracking.ArtifactError(f"{this_is} lives in {self.describe()}, but {other_is} in "
                                         f"{other.describe()}; they must share one input space")

    def spec(self) -> dict:
        """JSON-ready description (the tensors travel separately, see ``tensors``)."""
        meta = self.info
        return {"dataset": self.dataset, "mean": list(meta.mean), "std": list(meta.std),
                "zca": self.zca is not None, "zca_digest": self.digest}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in self.zca.tensors().items()} if self.zca is not None else {}

    @classmethod
    def from_stored(cls, spec: dict, tensors: dict[str, torch.Tensor]) -> InputSpace:
        """The space a ``spec`` describes, its matrix taken from ``tensors``; checked against the digest."""
        dataset = spec.get("dataset")
        data.info(dataset)
        if not spec.get("zca"):
            return cls(dataset)
        keys = ("zca.mean", "zca.matrix", "zca.inverse")
        if any(k not in tensors for k in keys):
            raise ValueError("the spec says ZCA, but the whitening matrix is missing")
        size = data.info(dataset).channels * data.info(dataset).image_size ** 2
        shapes = {"zca.mean": (size,), "zca.matrix": (size, size), "zca.inverse": (size, size)}
        for k in keys:
            if tuple(tensors[k].shape) != shapes[k] or tensors[k].dtype != torch.float32:
                raise ValueError(f"{k} is {tensors[k].dtype} {tuple(tensors[k].shape)}, expected float32 {shapes[k]}")
        space = cls(dataset, data.ZCA.from_tensors(tensors))
        if spec.get("zca_digest") not in (None, space.digest):
            raise ValueError(f"the whitening matrix does not match its digest {spec['zca_digest']}")
        return space
