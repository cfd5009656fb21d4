"""Data layer of the deep benchmarks: in-memory image datasets and a device-resident training loader."""

from .errors import DataError
from .loader import GPULoader
from .vision import (DATASETS, DEBIAN_FASHION_MNIST, OOD_SETS, REFERENCE_STATS, STATS, ImageData, channel_stats,
                     load_dataset, load_image_folder, load_ood_sets)

__all__ = ["DATASETS", "DEBIAN_FASHION_MNIST", "OOD_SETS", "REFERENCE_STATS", "STATS", "DataError", "GPULoader",
           "ImageData", "channel_stats", "load_dataset", "load_image_folder", "load_ood_sets"]
