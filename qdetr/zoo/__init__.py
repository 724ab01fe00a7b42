"""Model zoo: pretrained weights, release-checkpoint conversion, packed low-bit files, Hub.

The zoo owns every model file format on disk: the packed ``save_pretrained`` directory
(:mod:`qdetr.zoo.hub`), the Q-DETR release layout (:mod:`qdetr.zoo.release`,
:mod:`qdetr.zoo.release_format`) and the files of a training run (:mod:`qdetr.zoo.run_files`).

Public API:

* :func:`resolve_model`, the one resolver every command uses (run folder, ``save_pretrained``
  folder, ``model_final.pt`` / ``checkpoint.pt``, release ``.pth``, zoo name, Hub id);
* :func:`from_pretrained` (zoo name, local directory, release ``.pth``, Hub repo id) and
  :func:`list_pretrained`;
* :func:`save_pretrained` / :func:`push_to_hub` (packed ``model.safetensors`` +
  ``config.json`` + model card) and :func:`attach_pretrained_methods`;
* :func:`predict` (images -> absolute xyxy detections);
* :func:`load_release_checkpoint` and :func:`load_checkpoint_file` (safe pickle loading);
* :func:`download_url` (verified, resumable, atomic downloads into ``$QDETR_CACHE``);
* :func:`pack_codes` / :func:`unpack_codes` (the bit-packing layout).
"""

from qdetr.zoo import entries as _entries  # noqa: F401  (registers the zoo entries)
from qdetr.zoo.cache import OfflineModeError, default_cache_dir, is_offline
from qdetr.zoo.download import ChecksumError, DownloadError, HTMLResponseError, download_url, gdrive_download_url
from qdetr.zoo.hub import load_from_hub, load_pretrained_dir, push_to_hub, save_pretrained
from qdetr.zoo.packing import pack_codes, unpack_codes
from qdetr.zoo.prediction import predict
from qdetr.zoo.pretrained import attach_pretrained_methods, from_pretrained
from qdetr.zoo.resolve import resolve_model, resolve_state_dict
from qdetr.zoo.registry import PretrainedEntry, get_pretrained_entry, list_pretrained, register_pretrained
from qdetr.zoo.release import BitWidthError, load_release_checkpoint
from qdetr.zoo.release_format import (
    ReleaseConversionReport,
    ReleaseFormatError,
    convert_release_state_dict,
    load_release_state_dict,
)
from qdetr.zoo.safe_load import UnsafeCheckpointError, load_checkpoint_file

__all__ = [
    # loading and saving
    "resolve_model",
    "resolve_state_dict",
    "from_pretrained",
    "list_pretrained",
    "save_pretrained",
    "push_to_hub",
    "load_pretrained_dir",
    "load_from_hub",
    "attach_pretrained_methods",
    "predict",
    # registry
    "PretrainedEntry",
    "register_pretrained",
    "get_pretrained_entry",
    # release checkpoints
    "load_release_checkpoint",
    "load_checkpoint_file",
    "convert_release_state_dict",
    "load_release_state_dict",
    "ReleaseConversionReport",
    "ReleaseFormatError",
    "BitWidthError",
    "UnsafeCheckpointError",
    # downloads and cache
    "download_url",
    "gdrive_download_url",
    "default_cache_dir",
    "is_offline",
    "DownloadError",
    "ChecksumError",
    "HTMLResponseError",
    "OfflineModeError",
    # packing
    "pack_codes",
    "unpack_codes",
]
