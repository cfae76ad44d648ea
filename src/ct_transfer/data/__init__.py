"""Data: find images, decode them to one fixed mode, preprocess and cache them, split them, and
augment batches. Submodules: ``decode`` → ``preprocess`` → ``cache``; ``split``; ``transforms``."""

from .cache import MEMORY, ImageCache, MemoryCache, load_subset, stack
from .store import StoredImages, build_store, open_store
from .decode import (DEFAULT_WINDOW, DICOM_EXTENSIONS, IMAGE_EXTENSIONS, as_rgb_array, decode_any, decode_bytes,
                     is_dicom, read_dicom, read_image, read_input, to_rgb_array)
from .preprocess import Preprocess, resize_array
from .split import (DEFAULT_POSITIVE, PAPER_PER_CLASS, SAMPLE_FIELDS, SUBSETS, Item, apply_class_map, build_split, carve_test, class_order,
                    data_root, limit_rows, make_split, pixel_duplicates_across_subsets, row_exists, row_input, row_path, source_ids, source_names, source_weights, read_split, resolve_classes, scan_folder, split_counts,
                    split_folder, write_split, check_name, content_digests, file_identity,
                    normalise_path, resolve_inside, same_file_rows, shown)
from .steps import CROPS, INTENSITIES, Clahe, CropForeground, PercentileIntensity
from .transforms import (AUGMENTATIONS, Compose, Normalize, RandomAffine, RandomBlur, RandomBrightness,
                         RandomContrastGamma, RandomJPEG, RandomNoise, RandomResizedCrop, ToFloat, augmentation,
                         batch_transform, domain_augmentation, paper_augmentation)

__all__ = [
    "MEMORY", "ImageCache", "MemoryCache", "load_subset", "stack", "StoredImages", "build_store", "open_store", "DEFAULT_WINDOW", "DICOM_EXTENSIONS", "IMAGE_EXTENSIONS",
    "as_rgb_array", "decode_any", "decode_bytes", "is_dicom", "read_dicom", "read_image", "read_input",
    "to_rgb_array", "Preprocess", "resize_array", "DEFAULT_POSITIVE", "PAPER_PER_CLASS", "SUBSETS", "Item",
    "data_root", "class_order", "limit_rows", "make_split", "pixel_duplicates_across_subsets", "read_split",
    "resolve_classes", "scan_folder", "split_counts", "split_folder", "write_split", "Compose", "Normalize", "RandomAffine",
    "RandomBrightness", "ToFloat", "batch_transform", "paper_augmentation",
    "apply_class_map", "build_split", "SAMPLE_FIELDS", "carve_test", "row_exists", "row_input", "row_path", "source_ids", "source_names", "source_weights", "CROPS", "INTENSITIES", "Clahe", "CropForeground", "PercentileIntensity", "AUGMENTATIONS", "RandomBlur",
    "RandomContrastGamma", "RandomJPEG", "RandomNoise", "RandomResizedCrop", "augmentation", "domain_augmentation",
    "check_name", "content_digests", "file_identity", "normalise_path", "resolve_inside",
    "same_file_rows", "shown",
]
