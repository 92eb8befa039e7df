"""Data for LMTTM: the MedMNIST 3D datasets (downloaded, MD5-checked, held in memory) and `synthetic3d`.

Typical use::

    from data import batches, load_splits

    splits = load_splits("adrenalmnist3d", root="~/.medmnist", size=28)
    for x, y in batches(splits["train"], 32, shuffle=True, generator=torch.Generator().manual_seed(0)):
        ...  # x: float32 (B, 1, 28, 28, 28) in [0, 1]; y: int64 (B,)
"""

from data.download import download_file, file_md5
from data.info import DATASET_NAMES, DataError, DatasetInfo, dataset_info
from data.loading import Split, batches, check_split, data_md5, load_splits

__all__ = [
    "DATASET_NAMES",
    "DataError",
    "DatasetInfo",
    "Split",
    "batches",
    "check_split",
    "data_md5",
    "dataset_info",
    "download_file",
    "file_md5",
    "load_splits",
]
