"""Reference NIfTI files: reading their headers, the cache, their hashes."""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.reference import file_sha256, read_reference, reference_sha256

MakeReference = Callable[..., Path]


class TestReadReference:
    def test_unreadable_reference(self, tmp_path: Path) -> None:
        """Garbage, a missing file, or a non-NIfTI image are BAD_REFERENCE."""
        garbage = tmp_path / "g.nii.gz"
        garbage.write_bytes(gzip.compress(b"x" * 400))
        for path in (garbage, tmp_path / "missing.nii"):
            with pytest.raises(ConversionError) as caught:
                read_reference(path)
            assert caught.value.code is ErrorCode.BAD_REFERENCE
            assert caught.value.reference == path

    def test_messages_name_the_input_when_given(self, tmp_path: Path) -> None:
        """BAD_REFERENCE names the input the reference was wanted for, and the reference."""
        garbage = tmp_path / "g.nii.gz"
        garbage.write_bytes(gzip.compress(b"x" * 400))
        for path in (garbage, tmp_path / "missing.nii"):
            with pytest.raises(ConversionError) as caught:
                read_reference(path, input_name="case3.npy")
            assert caught.value.message.startswith(f"case3.npy: reference {path}: expected")

    def test_cache_follows_changes(self, tmp_path: Path, make_reference: MakeReference) -> None:
        """The cached header is re-read when the reference file changes."""
        path = make_reference("r.nii", shape=(2, 2, 2))
        assert read_reference(path).shape == (2, 2, 2)
        assert read_reference(path) is read_reference(path)
        nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 3), np.uint8), np.eye(4)), path)
        assert read_reference(path).shape == (3, 3, 3, 3)


class TestHashes:
    def test_file_sha256_is_the_sha256_of_the_bytes(self, tmp_path: Path) -> None:
        """file_sha256 hashes the whole file, however many blocks it takes."""
        path = tmp_path / "r.nii"
        content = os.urandom(3 * 1024 * 1024 + 5)
        path.write_bytes(content)
        assert file_sha256(path) == hashlib.sha256(content).hexdigest()

    def test_reference_sha256_follows_changes(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """The cached hash is computed again when the reference file changes."""
        path = make_reference("r.nii", shape=(2, 2, 2))
        before = reference_sha256(path)
        assert before == file_sha256(path)
        nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.uint8), np.eye(4)), path)
        assert reference_sha256(path) == file_sha256(path) != before
