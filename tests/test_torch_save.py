"""A torch.save file read without torch gives what torch.load gives, as numpy arrays, and refuses anything else."""

from __future__ import annotations

import datetime
import pickle

import numpy as np
import pytest
import torch

from eagle3_cache.errors import CacheConfigError
from eagle3_cache.torch_save import load_torch_save
from eagle3_cache.vocab_selection import read_vocab_selection


def test_tensors_of_every_stored_dtype_and_layout_come_back_equal(tmp_path):
    base = torch.arange(24, dtype=torch.int64).view(4, 6)
    saved = {
        "ids": torch.tensor([7, 3, 5]),
        "mask": torch.tensor([True, False, True]),
        "half": torch.linspace(-1, 1, 5, dtype=torch.float16),
        "floats": torch.linspace(-1, 1, 5),
        "int32": torch.tensor([1, -2], dtype=torch.int32),
        "view": base[1:3, ::2],  # a strided view into a bigger storage
        "transposed": base.t(),
        "empty": torch.zeros(0, dtype=torch.int64),
        "plain": [1, "two", {"three": 3.0}],
    }
    path = tmp_path / "mixed.pt"
    torch.save(saved, path)
    loaded = load_torch_save(path)
    assert loaded.keys() == saved.keys() and loaded["plain"] == saved["plain"]
    for key, tensor in saved.items():
        if isinstance(tensor, torch.Tensor):
            assert loaded[key].dtype == tensor.numpy().dtype, key
            assert np.array_equal(loaded[key], tensor.numpy()), key


def test_any_other_object_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"when": datetime.date(2026, 12, 2)}, path)
    with pytest.raises(pickle.UnpicklingError, match="datetime.date is not a plain tensor or container"):
        load_torch_save(path)


@pytest.mark.parametrize("content", [b"", b"not a zip file", b"PK\x03\x04broken"])
def test_a_damaged_selection_file_names_the_file_and_the_rule_to_rerun(tmp_path, content):
    path = tmp_path / "vocab_selection.pt"
    path.write_bytes(content)
    with pytest.raises(CacheConfigError, match=r"vocab_selection.pt: not a readable vocab selection .* select_vocab"):
        read_vocab_selection(path)
