"""Schemas of datasets: uploaded ones and the built-ins."""

from __future__ import annotations

from pydantic import BaseModel, Field

from app.schemas import DELETED_AT_DESCRIPTION, Page
from app.uploads import multipart_openapi
from core.db.models import Dataset
from core.views import OutModel, UtcDatetime
from worker.engine.config import BUILTIN_DATASETS


class DatasetShape(BaseModel):
    """What a job needs to know about a dataset: classes, sizes, image shape."""

    format: str = Field(description="npz, zip or tar for uploads; builtin for the built-ins.", examples=["zip"])
    num_classes: int = Field(examples=[10])
    class_names: list[str] = Field(examples=[["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]])
    num_samples: int = Field(examples=[1797])
    class_counts: list[int] = Field(description="Samples per class, in class_names order.",
                                    examples=[[178, 182, 177, 183, 181, 182, 181, 179, 174, 180]])
    image_shape: list[int] = Field(description="[height, width, channels] of every image.", examples=[[8, 8, 1]])


class DatasetOut(DatasetShape, OutModel):
    """An uploaded dataset, converted to one canonical .npz the workers read."""

    id: str = Field(examples=["dst_9a1b2c3d4e5f60718293a4b5"])
    name: str = Field(examples=["flowers"])
    sha256: str = Field(description="sha256 of the file as uploaded.")
    bytes: int = Field(description="Size of the file as uploaded.")
    canonical_sha256: str = Field(description="sha256 of the canonical .npz (uint8 images x, int64 labels y).")
    canonical_bytes: int | None = Field(description="Size of the canonical .npz: what counts against the storage "
                                        "quota (null for datasets stored before it was recorded).")
    created_at: UtcDatetime
    deleted_at: UtcDatetime | None = Field(default=None, description=DELETED_AT_DESCRIPTION)

    @classmethod
    def from_row(cls, row: Dataset) -> DatasetOut:
        return cls.model_validate(row)


class BuiltinDatasetOut(DatasetShape):
    name: str = Field(description="Use this name as a job's `dataset`.", examples=["digits"])
    description: str


class DatasetPage(Page[DatasetOut]):
    builtin: list[str] = Field(
        default=list(BUILTIN_DATASETS),
        description="Built-in datasets, usable by name as a job's `dataset` without uploading anything; "
        "GET /v1/datasets/builtin describes them.",
    )


BUILTIN_DESCRIPTIONS = {
    "digits": "1,797 real 8x8 grayscale handwritten digits (0-9) from scikit-learn (UCI optical recognition).",
    "photo-patches": "1,400 32x32 RGB crops of 14 photographs shipped with scikit-image and scikit-learn; the class "
    "is the photograph. Each crop comes from its own part of its photograph, so validation crops are unseen.",
    "shapes": "2,000 32x32 RGB images of 10 rendered shapes (circle, square, triangle, pentagon, hexagon, star, cross, "
    "ring, crescent, arrow), 200 each, drawn with a fixed seed: random colour, size, place and rotation over a "
    "textured background.",
}

UPLOAD_OPENAPI = multipart_openapi(
    {"name": {"type": "string", "maxLength": 200, "description": "Display name; defaults to the file name."}},
    required=[],
)
