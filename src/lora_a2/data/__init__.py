"""Text-classification data: loaders (offline corpora, local files, HF hub) and partitioners."""

from lora_a2.data.datasets import DATASET_NAMES, SOURCE_PREFIXES, TextDataset, load_dataset
from lora_a2.data.partition import PARTITION_METHODS, label_histogram, partition

__all__ = [
    "DATASET_NAMES",
    "PARTITION_METHODS",
    "SOURCE_PREFIXES",
    "TextDataset",
    "label_histogram",
    "load_dataset",
    "partition",
]
