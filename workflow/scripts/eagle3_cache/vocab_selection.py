"""The draft vocabulary file, `vocab_selection.pt`, read without torch (the file is Automodel's: see `vocab`)."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np

from .errors import CacheConfigError
from .torch_save import load_torch_save


def read_vocab_selection(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(selected_token_ids as int64 [Vd], target_vocab_size) from a file written by `vocab.write_vocab_selection`."""
    try:
        saved = load_torch_save(path)
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as error:
        raise CacheConfigError(
            f"{path}: not a readable vocab selection ({error}); rerun the select_vocab rule"
        ) from error
    if not isinstance(saved, dict) or not {"selected_token_ids", "target_vocab_size"} <= saved.keys():
        raise CacheConfigError(
            f"{path}: not a vocab selection (needs selected_token_ids and target_vocab_size); "
            "rerun the select_vocab rule"
        )
    return np.asarray(saved["selected_token_ids"], dtype=np.int64), int(saved["target_vocab_size"])
