"""Data: find images, decode them to one fixed mode, preprocess and cache them, split them, and
augment batches. Submodules: ``decode`` → ``preprocess`` → ``cache``; ``split``; ``transforms``."""

from .cache import MEMORY, ImageCache, MemoryCache, stack
from .decode import (DEFAULT_WINDOW, DICOM_EXTENSIONS, IMAGE_EXTENSIONS, as_rgb_array, decode_any, decode_bytes,
                     is_dicom, read_dicom, read_image, read_input, to_rgb_array)
from .preprocess import Preprocess, resize_array
from .split import (DEFAULT_POSITIVE, PAPER_PER_CLASS, SUBSETS, Item, class_order, limit_rows, make_split,
                    pixel_duplicates_across_subsets, read_split, resolve_classes, scan_folder, split_counts,
                    split_folder, write_split)
from .transforms import (Compose, Normalize, RandomAffine, RandomBrightness, ToFloat, batch_transform,
                         paper_augmentation)

__all__ = [
    "MEMORY", "ImageCache", "MemoryCache", "stack", "DEFAULT_WINDOW", "DICOM_EXTENSIONS", "IMAGE_EXTENSIONS",
    "as_rgb_array", "decode_any", "decode_bytes", "is_dicom", "read_dicom", "read_image", "read_input",
    "to_rgb_array", "Preprocess", "resize_array", "DEFAULT_POSITIVE", "PAPER_PER_CLASS", "SUBSETS", "Item",
    "class_order", "limit_rows", "make_split", "pixel_duplicates_across_subsets", "read_split",
    "resolve_classes", "scan_folder", "split_counts", "split_folder", "write_split", "Compose", "Normalize", "RandomAffine",
    "RandomBrightness", "ToFloat", "batch_transform", "paper_augmentation",
]
