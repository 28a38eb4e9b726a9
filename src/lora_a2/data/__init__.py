"""Data: classification and instruction loaders (offline corpora, local files, HF hub) and the
non-IID partitioners (over class labels or instruction categories)."""

from .classification import DATASET_NAMES, SOURCE_PREFIXES, TextDataset, load_dataset
from .instructions import INSTRUCTION_DATASETS, InstructionDataset, load_instructions
from .partition import PARTITION_METHODS, label_histogram, partition
from .readers import local_inputs

__all__ = [
    "DATASET_NAMES",
    "INSTRUCTION_DATASETS",
    "InstructionDataset",
    "load_instructions",
    "PARTITION_METHODS",
    "SOURCE_PREFIXES",
    "TextDataset",
    "label_histogram",
    "load_dataset",
    "local_inputs",
    "partition",
]
