"""The public functions: convert_file, and the nidataset-compatible pair."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import niftidrop.api
from niftidrop import ConversionError, ErrorCode, convert_file, nifti_to_numpy, numpy_to_nifti
from niftidrop.settings import Settings

MakeReference = Callable[..., Path]


def _settings(**values: object) -> Settings:
    return Settings.model_validate(values)


def _saved(path: Path, array: np.ndarray) -> Path:
    """`array` saved as the .npy at `path`."""
    np.save(path, array)
    return path


def _voxels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


class TestConvertFile:
    def test_result_describes_the_conversion(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """The result names input, outputs, shapes, dtypes and byte counts."""
        reference = make_reference(shape=(4, 5, 6))
        source = _saved(tmp_path / "case.npy", np.ones((4, 5, 6), np.int64))
        result = convert_file(source, tmp_path / "out", settings=_settings(), reference=reference)
        assert result.input == source
        assert result.outputs == (tmp_path / "out" / "case.nii.gz",)
        assert (result.shape_in, result.shape_out) == ((4, 5, 6), (4, 5, 6))
        assert (result.dtype_in, result.dtype_out) == ("int64", "uint8")
        assert result.bytes_in == source.stat().st_size
        assert result.bytes_out == result.outputs[0].stat().st_size
        assert result.seconds >= 0

    def test_stem_and_uncompressed_output(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """`stem` names the output; compress=false writes a plain .nii."""
        reference = make_reference(shape=(4, 5, 6))
        source = _saved(tmp_path / ".claimed-123.npy", np.zeros((4, 5, 6), np.float32))
        result = convert_file(
            source,
            tmp_path,
            settings=_settings(compress=False),
            reference=reference,
            stem="case7",
        )
        assert result.outputs == (tmp_path / "case7.nii",)
        assert nib.load(result.outputs[0]).shape == (4, 5, 6)

    def test_split_writes_one_file_per_channel(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """channels=split gives <stem>_c<N> per channel, in channel order."""
        reference = make_reference(shape=(4, 5, 6))
        probabilities = np.random.default_rng(1).random((3, 4, 5, 6)).astype(np.float32)
        source = _saved(tmp_path / "p.npy", probabilities)
        result = convert_file(
            source, tmp_path / "o", settings=_settings(channels="split"), reference=reference
        )
        assert [path.name for path in result.outputs] == [
            "p_c0.nii.gz",
            "p_c1.nii.gz",
            "p_c2.nii.gz",
        ]
        for channel, path in enumerate(result.outputs):
            np.testing.assert_array_equal(_voxels(path), probabilities[channel])
        assert result.bytes_out == sum(path.stat().st_size for path in result.outputs)

    def test_on_conflict_rename_and_fail(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """rename adds a unique suffix; fail raises OUTPUT_CONFLICT and keeps the old file."""
        reference = make_reference(shape=(4, 5, 6))
        source = _saved(tmp_path / "a.npy", np.zeros((4, 5, 6), np.uint8))
        out = tmp_path / "out"
        first = convert_file(source, out, settings=_settings(), reference=reference)
        renamed = convert_file(
            source, out, settings=_settings(on_conflict="rename"), reference=reference
        )
        assert renamed.outputs == (out / "a-1.nii.gz",)
        before = first.outputs[0].read_bytes()
        with pytest.raises(ConversionError) as caught:
            convert_file(source, out, settings=_settings(on_conflict="fail"), reference=reference)
        assert caught.value.code is ErrorCode.OUTPUT_CONFLICT
        assert first.outputs[0].read_bytes() == before

    def test_output_conflict_names_the_input_and_the_output(
        self, tmp_path: Path, make_reference: MakeReference, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An output conflict names the input and the output, whether the output was
        there before the conversion or appeared while it was written."""
        reference = make_reference(shape=(4, 5, 6))
        source = _saved(tmp_path / "case7.npy", np.zeros((4, 5, 6), np.uint8))
        out = tmp_path / "out"
        out.mkdir()
        taken = out / "case7.nii.gz"
        settings = _settings(on_conflict="fail")
        real_write_temp = niftidrop.api.write_temp

        def write_then_conflict(final: Path, *args: Any, **kwargs: Any) -> Path:
            temp = real_write_temp(final, *args, **kwargs)
            final.write_bytes(b"a late arrival")
            return temp

        monkeypatch.setattr(niftidrop.api, "write_temp", write_then_conflict)
        for situation in ("appeared", "there before"):
            with pytest.raises(ConversionError) as caught:
                convert_file(source, out, settings=settings, reference=reference)
            assert caught.value.code is ErrorCode.OUTPUT_CONFLICT, situation
            assert "case7.npy" in caught.value.message, situation
            assert str(taken) in caught.value.message, situation
            monkeypatch.undo()
        assert taken.read_bytes() == b"a late arrival"

    def test_bad_reference_names_the_input_and_the_reference(self, tmp_path: Path) -> None:
        """A reference that is no NIfTI file fails naming the input and the reference."""
        reference = tmp_path / "broken.nii.gz"
        reference.write_bytes(b"not a NIfTI file" * 40)
        source = _saved(tmp_path / "case8.npy", np.zeros((4, 5, 6), np.uint8))
        with pytest.raises(ConversionError) as caught:
            convert_file(source, tmp_path / "out", settings=_settings(), reference=reference)
        assert caught.value.code is ErrorCode.BAD_REFERENCE
        assert "case8.npy" in caught.value.message
        assert str(reference) in caught.value.message

    def test_reprocessing_gives_identical_bytes(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """Same input, same output bytes (idempotent reprocessing after a crash)."""
        reference = make_reference(shape=(16, 16, 16))
        source = _saved(tmp_path / "a.npy", np.random.default_rng(2).random((16, 16, 16)))
        one = convert_file(source, tmp_path / "1", settings=_settings(), reference=reference)
        two = convert_file(
            source, tmp_path / "2", settings=_settings(compression_threads=1), reference=reference
        )
        assert one.outputs[0].read_bytes() == two.outputs[0].read_bytes()

    def test_rejection_leaves_no_output(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """A rejected input leaves nothing in the output folder, not even a temp file."""
        reference = make_reference(shape=(4, 5, 6))
        source = _saved(tmp_path / "a.npy", np.full((4, 5, 6), 300.5))
        out = tmp_path / "out"
        with pytest.raises(ConversionError) as caught:
            convert_file(source, out, settings=_settings(dtype="uint8"), reference=reference)
        assert caught.value.code is ErrorCode.DTYPE_OVERFLOW
        assert not out.exists() or list(out.iterdir()) == []

    def test_unreadable_reference_is_bad_reference(self, tmp_path: Path) -> None:
        """A reference nibabel cannot read is BAD_REFERENCE and names the reference."""
        reference = tmp_path / "scan.nii.gz"
        reference.write_bytes(b"not a nifti file")
        source = _saved(tmp_path / "a.npy", np.zeros((2, 2, 2)))
        with pytest.raises(ConversionError) as caught:
            convert_file(source, tmp_path, settings=_settings(), reference=reference)
        assert caught.value.code is ErrorCode.BAD_REFERENCE
        assert caught.value.reference == reference

    def test_no_reference_uses_affine(self, tmp_path: Path) -> None:
        """reference=None writes the given affine."""
        source = _saved(tmp_path / "a.npy", np.zeros((2, 3, 4), np.float32))
        affine = np.diag([1.0, 1.0, 2.0, 1.0])
        result = convert_file(source, tmp_path, settings=_settings(), reference=None, affine=affine)
        np.testing.assert_array_equal(nib.load(result.outputs[0]).affine, affine)

    def test_sidecar_records_provenance(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """sidecar=true writes <stem>.json with hashes, rule and dtypes."""
        reference = make_reference(shape=(4, 5, 6))
        source = _saved(tmp_path / "a.npy", np.zeros((4, 5, 6), bool))
        convert_file(
            source,
            tmp_path / "out",
            settings=_settings(sidecar=True),
            reference=reference,
            provenance={"input": "sub/a.npy", "rule": "exact"},
        )
        record = json.loads((tmp_path / "out" / "a.json").read_text())
        assert record["input"] == "sub/a.npy"
        assert record["rule"] == "exact"
        assert len(record["input_sha256"]) == len(record["reference_sha256"]) == 64
        assert (record["dtype_in"], record["dtype_out"]) == ("bool", "uint8")
        assert record["niftidrop_version"]
        assert record["profile"] is None

    def test_sidecar_records_the_profile_and_conversion_settings(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """The sidecar names the profile given in the provenance and the conversion
        settings the output was made with (axis_order, channels, dtype, npz_key)."""
        reference = make_reference(shape=(4, 5, 6))
        source = tmp_path / "a.npz"
        np.savez(source, probabilities=np.zeros((2, 6, 5, 4), np.float32))
        settings = _settings(
            sidecar=True, axis_order="zyx", channels="argmax", npz_key="probabilities"
        )
        convert_file(
            source,
            tmp_path / "out",
            settings=settings,
            reference=reference,
            provenance={"profile": "nnunet"},
        )
        record = json.loads((tmp_path / "out" / "a.json").read_text())
        assert record["profile"] == "nnunet"
        assert record["settings"] == {
            "axis_order": "zyx",
            "channels": "argmax",
            "dtype": "auto",
            "npz_key": "probabilities",
        }

    def test_vector_gives_one_image_of_vectors(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """channels="vector" writes one .nii.gz that SimpleITK reads as one 3-D image of
        C-component voxels and nibabel as x, y, z, 1, C with intent vector."""
        reference = make_reference(shape=(4, 5, 6))
        source = _saved(tmp_path / "p.npy", np.random.default_rng(2).random((3, 4, 5, 6)))
        result = convert_file(
            source, tmp_path, settings=Settings.from_values(channels="vector"), reference=reference
        )
        (output,) = result.outputs
        image = sitk.ReadImage(str(output))
        assert (image.GetSize(), image.GetNumberOfComponentsPerPixel()) == ((4, 5, 6), 3)
        assert image.GetSpacing() == pytest.approx(sitk.ReadImage(str(reference)).GetSpacing())
        assert nib.load(output).shape == result.shape_out == (4, 5, 6, 1, 3)
        assert nib.load(output).header.get_intent()[0] == "vector"


class TestAllOrNothing:
    """channels = split gives all its outputs or none (and the sidecar with them)."""

    def test_a_conflict_on_a_later_channel_places_no_channel(
        self, tmp_path: Path, make_reference: MakeReference, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`_c1` taken while `_c0` is written (on_conflict = fail): no `_c0` is left."""
        from niftidrop import api

        reference = make_reference(shape=(4, 5, 6))
        source = _saved(tmp_path / "p.npy", np.ones((2, 4, 5, 6), np.float32))
        out = tmp_path / "out"
        real_write_temp = api.write_temp

        def taken_meanwhile(final: Path, *args: object, **kwargs: object) -> object:
            written = real_write_temp(final, *args, **kwargs)  # type: ignore[arg-type]
            (out / "p_c1.nii.gz").write_bytes(b"someone else's")
            return written

        monkeypatch.setattr(api, "write_temp", taken_meanwhile)
        with pytest.raises(ConversionError) as caught:
            convert_file(
                source,
                out,
                settings=_settings(channels="split", on_conflict="fail"),
                reference=reference,
            )
        assert caught.value.code is ErrorCode.OUTPUT_CONFLICT
        assert sorted(path.name for path in out.iterdir()) == ["p_c1.nii.gz"]

    def test_an_error_after_a_commit_takes_the_outputs_back(
        self, tmp_path: Path, make_reference: MakeReference, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A full disk at the second commit removes the first output: retried whole."""
        from niftidrop import api

        reference = make_reference(shape=(4, 5, 6))
        source = _saved(tmp_path / "p.npy", np.ones((2, 4, 5, 6), np.float32))
        out = tmp_path / "out"
        real_commit = api.commit
        calls: list[Path] = []

        def second_fails(temp: object, final: Path, **kwargs: object) -> object:
            calls.append(final)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
            return real_commit(temp, final, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(api, "commit", second_fails)
        for on_conflict in ("overwrite", "rename"):
            calls.clear()
            with pytest.raises(OSError, match="No space"):
                convert_file(
                    source,
                    out,
                    settings=_settings(channels="split", on_conflict=on_conflict, sidecar=True),
                    reference=reference,
                )
            assert list(out.iterdir()) == []

    def test_bytes_out_does_not_need_the_outputs_after_their_commit(
        self, tmp_path: Path, make_reference: MakeReference, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An output taken away the moment it appears: the result is still given."""
        from niftidrop import api

        reference = make_reference(shape=(4, 5, 6))
        source = _saved(tmp_path / "p.npy", np.ones((4, 5, 6), np.float32))
        taken = tmp_path / "taken"
        taken.mkdir()
        real_commit = api.commit

        def eager_consumer(temp: object, final: Path, **kwargs: object) -> Path:
            placed: Path = real_commit(temp, final, **kwargs)  # type: ignore[arg-type]
            placed.rename(taken / placed.name)
            return placed

        monkeypatch.setattr(api, "commit", eager_consumer)
        result = convert_file(source, tmp_path / "out", settings=_settings(), reference=reference)
        assert result.bytes_out == (taken / "p.nii.gz").stat().st_size


class TestSeedExamples:
    """The examples of the seed page, with `niftidrop` in place of nidataset."""

    def test_with_reference_nifti(self, make_reference: MakeReference) -> None:
        """numpy_to_nifti(npz, folder, reference_nifti=...) copies the geometry."""
        reference = make_reference("case001.nii.gz", shape=(4, 5, 6))
        Path("predictions").mkdir()
        np.savez("predictions/case001.npz", pred=np.ones((4, 5, 6), np.float32))
        written = numpy_to_nifti(
            npy_path="predictions/case001.npz",
            output_path="results/",
            reference_nifti=str(reference),
        )
        assert Path(written) == Path("results/case001.nii.gz")
        np.testing.assert_array_equal(nib.load(written).affine, nib.load(reference).affine)

    def test_with_custom_affine(self) -> None:
        """An explicit affine is written as given."""
        Path("data").mkdir()
        np.save("data/volume.npy", np.zeros((3, 3, 3), np.float32))
        affine = np.diag([1.0, 1.0, 2.0, 1.0])
        written = numpy_to_nifti(npy_path="data/volume.npy", output_path="nifti/", affine=affine)
        assert written == str(Path("nifti/volume.nii.gz"))
        np.testing.assert_array_equal(nib.load(written).affine, affine)
        assert nib.load(written).header.get_zooms() == (1.0, 1.0, 2.0)

    def test_identity_affine_by_default(self) -> None:
        """Without affine or reference the affine is the identity."""
        Path("data").mkdir()
        np.save("data/array.npy", np.zeros((3, 3, 3), np.uint8))
        written = numpy_to_nifti("data/array.npy", "output/")
        np.testing.assert_array_equal(nib.load(written).affine, np.eye(4))

    def test_round_trip(self, make_reference: MakeReference) -> None:
        """nifti_to_numpy then numpy_to_nifti with the reference gives the same image."""
        original = make_reference("original.nii.gz", shape=(4, 5, 6), dtype="int16")
        saved = nifti_to_numpy(str(original), "temp/")
        assert saved == str(Path("temp/original.npz"))
        written = numpy_to_nifti(saved, "output/", reference_nifti=str(original))
        assert _voxels(Path(written)).dtype == np.int16
        np.testing.assert_array_equal(_voxels(Path(written)), _voxels(original))
        np.testing.assert_array_equal(nib.load(written).affine, nib.load(original).affine)

    def test_missing_input_is_file_not_found(self) -> None:
        """A missing input raises FileNotFoundError, as the seed documents."""
        with pytest.raises(FileNotFoundError):
            numpy_to_nifti("missing.npy", "out/")

    def test_reference_overrides_affine(self, make_reference: MakeReference) -> None:
        """reference_nifti wins over affine."""
        reference = make_reference(shape=(2, 2, 2))
        np.save("a.npy", np.zeros((2, 2, 2), np.float32))
        written = numpy_to_nifti("a.npy", "o", affine=np.eye(4) * 3, reference_nifti=str(reference))
        np.testing.assert_array_equal(nib.load(written).affine, nib.load(reference).affine)

    def test_rejection_is_a_value_error_with_code(self) -> None:
        """A rejected input raises ConversionError, a ValueError carrying the code."""
        np.save("a.npy", np.array([None], dtype=object), allow_pickle=True)
        with pytest.raises(ValueError, match=r"a\.npy") as caught:
            numpy_to_nifti("a.npy", "o")
        assert isinstance(caught.value, ConversionError)
        assert caught.value.code is ErrorCode.UNSUPPORTED_DTYPE

    def test_debug_logs_the_output_path(self, caplog: pytest.LogCaptureFixture) -> None:
        """debug=True logs where the file was saved."""
        np.save("a.npy", np.zeros((2, 2, 2), np.float32))
        with caplog.at_level("INFO", logger="niftidrop"):
            written = numpy_to_nifti("a.npy", "o", debug=True)
        assert written in caplog.text

    def test_nifti_to_numpy_uncompressed(self, make_reference: MakeReference) -> None:
        """compressed=False writes <prefix>.npy with the stored dtype."""
        original = make_reference("scan.nii", dtype="uint8")
        saved = nifti_to_numpy(str(original), "t", compressed=False)
        assert saved == str(Path("t/scan.npy"))
        assert np.load(saved).dtype == np.uint8


class TestPathArguments:
    """Every path argument may be a `str` or a `Path`."""

    def test_convert_file_takes_str_paths(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """source, out_dir, reference and journal given as str: converted, and the
        result holds Paths."""
        reference = make_reference(shape=(4, 5, 6))
        source = _saved(tmp_path / "case.npy", np.full((4, 5, 6), 7, np.uint8))
        result = convert_file(
            str(source),
            str(tmp_path / "out"),
            settings=_settings(on_conflict="rename"),
            reference=str(reference),
            journal=str(tmp_path / "journal.json"),
        )
        assert result.input == source
        assert result.outputs == (tmp_path / "out" / "case.nii.gz",)
        np.testing.assert_array_equal(_voxels(result.outputs[0]), np.full((4, 5, 6), 7))
        np.testing.assert_array_equal(
            nib.load(result.outputs[0]).affine, nib.load(reference).affine
        )
        assert (tmp_path / "journal.json").exists()

    def test_the_nidataset_pair_takes_paths(self, make_reference: MakeReference) -> None:
        """numpy_to_nifti and nifti_to_numpy take Path objects too, and return str."""
        reference = make_reference("case.nii.gz", shape=(2, 3, 4))
        source = _saved(Path("case.npy"), np.ones((2, 3, 4), np.float32))
        written = numpy_to_nifti(source, Path("out"), reference_nifti=reference)
        assert written == str(Path("out/case.nii.gz"))
        assert nifti_to_numpy(Path(written), Path("back")) == str(Path("back/case.npz"))


# `numpy_to_nifti(..., debug=True)` and `nifti_to_numpy(..., debug=True)` in a fresh
# interpreter: argv[1] "configured" sets up logging first, "quiet" passes debug=False.
_DEBUG_SCRIPT = """
import logging, sys
import numpy as np
from niftidrop import nifti_to_numpy, numpy_to_nifti
if sys.argv[1] == "configured":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
debug = sys.argv[1] != "quiet"
np.save("a.npy", np.zeros((2, 2, 2), np.float32))
written = numpy_to_nifti("a.npy", "out", debug=debug)
print(written, nifti_to_numpy(written, "back", debug=debug))
"""


def _debug_run(mode: str) -> tuple[str, list[str]]:
    """stdout and the "saved at" lines on stderr of `_DEBUG_SCRIPT`, run in the working
    folder (other lines, a coverage notice say, are not the functions')."""
    done = subprocess.run(
        [sys.executable, "-c", _DEBUG_SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip(), [line for line in done.stderr.splitlines() if "saved at" in line]


class TestDebug:
    """debug=True shows the path written, as nidataset's page promises."""

    def test_shown_on_stderr_without_logging_set_up(self) -> None:
        """With logging not configured (Python would show only warnings) the paths
        appear on stderr, once each."""
        printed, errors = _debug_run("debug")
        assert printed == f"{Path('out/a.nii.gz')} {Path('back/a.npz')}"
        assert errors == [
            f"NIfTI file saved at: '{Path('out/a.nii.gz')}'",
            f"NumPy file saved at: '{Path('back/a.npz')}'",
        ]

    def test_logged_once_when_logging_is_set_up(self) -> None:
        """With logging configured at INFO the paths go through the `niftidrop` logger
        (its format, its handler) and nowhere else."""
        _, errors = _debug_run("configured")
        assert errors == [
            f"INFO niftidrop NIfTI file saved at: '{Path('out/a.nii.gz')}'",
            f"INFO niftidrop NumPy file saved at: '{Path('back/a.npz')}'",
        ]

    def test_silent_without_debug(self) -> None:
        """debug=False shows no path."""
        assert _debug_run("quiet")[1] == []


class TestEnvironmentIgnored:
    def test_numpy_to_nifti_reads_no_niftidrop_variable(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The nidataset-compatible API uses the defaults whatever NIFTIDROP_* says."""
        monkeypatch.setenv("NIFTIDROP_COMPRESS", "false")
        monkeypatch.setenv("NIFTIDROP_CHANNELS", "split")
        monkeypatch.setenv("NIFTIDROP_WORKERS", "abc")
        np.save("a.npy", np.zeros((2, 2, 2, 2), np.float32))
        written = numpy_to_nifti("a.npy", "o")
        assert written == str(Path("o/a.nii.gz"))
        assert nib.load(written).shape == (2, 2, 2, 2)
        assert [path.name for path in Path("o").iterdir()] == ["a.nii.gz"]


DTYPES = ["uint8", "int8", "int16", "uint16", "int32", "uint32", "float32", "float64"]


class TestRoundTripProperty:
    @hypothesis_settings(
        max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        dtype=st.sampled_from(DTYPES),
        shape=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)),
        seed=st.integers(0, 2**32 - 1),
    )
    def test_round_trip_is_exact(
        self,
        tmp_path_factory: pytest.TempPathFactory,
        dtype: str,
        shape: tuple[int, int, int],
        seed: int,
    ) -> None:
        """Any image, via nifti_to_numpy and back, keeps voxels, dtype and geometry."""
        folder = tmp_path_factory.mktemp("trip")
        rng = np.random.default_rng(seed)
        if np.dtype(dtype).kind == "f":
            data = rng.standard_normal(shape).astype(dtype) * 1e3
        else:
            info = np.iinfo(dtype)
            data = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
        affine = np.diag([0.5, 0.75, 3.0, 1.0])
        affine[:3, 3] = [1.0, -2.0, 3.5]
        original = folder / "img.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), original)
        saved = nifti_to_numpy(str(original), str(folder / "np"))
        written = Path(numpy_to_nifti(saved, str(folder / "back"), reference_nifti=str(original)))
        back = nib.load(written)
        assert back.get_data_dtype() == np.dtype(dtype)
        np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)
        np.testing.assert_array_equal(back.affine, nib.load(original).affine)


class TestRedoAfterACrash:
    """With rename or fail, the journal lets a redo recognise the outputs it placed."""

    @pytest.mark.parametrize("on_conflict", ["rename", "fail"])
    def test_a_redo_keeps_the_outputs_already_named(
        self, tmp_path: Path, make_reference: MakeReference, on_conflict: str
    ) -> None:
        """Converted again with its journal: the same names, no `-1` copy, no conflict."""
        reference = make_reference(shape=(4, 5, 6))
        source = _saved(tmp_path / "p.npy", np.ones((2, 4, 5, 6), np.float32))
        out, journal = tmp_path / "out", tmp_path / "journal.json"
        settings = _settings(channels="split", sidecar=True, on_conflict=on_conflict)
        first = convert_file(source, out, settings=settings, reference=reference, journal=journal)
        again = convert_file(source, out, settings=settings, reference=reference, journal=journal)
        assert again.outputs == first.outputs
        assert again.bytes_out == first.bytes_out
        assert sorted(path.name for path in out.iterdir()) == [
            "p.json",
            "p_c0.nii.gz",
            "p_c1.nii.gz",
        ]

    def test_a_redo_after_a_crash_between_two_names_places_only_the_rest(
        self, tmp_path: Path, make_reference: MakeReference, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Stopped after the first channel got its name: the redo adds only the second."""
        from niftidrop.steps import hooked

        reference = make_reference(shape=(4, 5, 6))
        source = _saved(tmp_path / "p.npy", np.ones((2, 4, 5, 6), np.float32))
        out, journal = tmp_path / "out", tmp_path / "journal.json"
        settings = _settings(channels="split", on_conflict="rename")
        commits = []

        def crash_at_second_commit(name: str) -> None:
            if name == "output_commit":
                commits.append(name)
                if len(commits) == 2:
                    raise SystemExit("killed")  # like a kill: nothing is taken back

        first_output = out / "p_c0.nii.gz"
        monkeypatch.setattr(niftidrop.api, "withdraw", lambda *args: None)
        with hooked(crash_at_second_commit), pytest.raises(SystemExit):
            convert_file(source, out, settings=settings, reference=reference, journal=journal)
        monkeypatch.undo()
        assert first_output.exists()
        inode = first_output.stat().st_ino
        again = convert_file(source, out, settings=settings, reference=reference, journal=journal)
        assert [path.name for path in again.outputs] == ["p_c0.nii.gz", "p_c1.nii.gz"]
        assert first_output.stat().st_ino == inode
        assert sorted(path.name for path in out.iterdir() if not path.name.startswith(".")) == [
            "p_c0.nii.gz",
            "p_c1.nii.gz",
        ]

    def test_overwrite_writes_no_journal(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """The default needs no record: a redo writes the same bytes under the same name."""
        reference = make_reference(shape=(4, 5, 6))
        source = _saved(tmp_path / "p.npy", np.ones((4, 5, 6), np.float32))
        journal = tmp_path / "journal.json"
        convert_file(
            source, tmp_path / "out", settings=_settings(), reference=reference, journal=journal
        )
        assert not journal.exists()


# A `labels` table as TOML gives it: values as strings.
LABELS = {"1": "liver", "2": "tumour"}


class TestLabels:
    """`labels`: label maps get intent NIFTI_INTENT_LABEL and `<stem>.dseg.tsv` beside them."""

    DSEG = "index\tname\n1\tliver\n2\ttumour\n"

    def _convert(
        self, tmp_path: Path, make_reference: MakeReference, array: np.ndarray, **values: Any
    ) -> niftidrop.api.ConversionResult:
        reference = make_reference(shape=(4, 5, 6))
        source = _saved(tmp_path / "case.npy", array)
        settings = _settings(labels=LABELS, **values)
        return convert_file(source, tmp_path / "out", settings=settings, reference=reference)

    @staticmethod
    def _label_map(top: int = 2) -> np.ndarray:
        return (np.arange(120) % (top + 1)).astype(np.uint8).reshape(4, 5, 6)

    def test_an_integer_output_is_a_label_map_with_its_table(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """nibabel reads intent code 1002 (label); dseg.tsv has a header and a row per label."""
        result = self._convert(tmp_path, make_reference, self._label_map())
        image = nib.load(result.outputs[0])
        assert int(image.header["intent_code"]) == 1002
        assert image.header.get_intent()[0] == "label"
        assert (tmp_path / "out" / "case.dseg.tsv").read_text() == self.DSEG
        np.testing.assert_array_equal(_voxels(result.outputs[0]), self._label_map())
        assert result.labels_missing == ()

    def test_labels_from_an_nnunet_dataset_json(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """A dataset.json's name → value labels give the same table, background included."""
        dataset = tmp_path / "dataset.json"
        dataset.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2}}))
        reference = make_reference(shape=(4, 5, 6))
        source = _saved(tmp_path / "case.npy", self._label_map())
        settings = _settings(labels=str(dataset))
        result = convert_file(source, tmp_path / "out", settings=settings, reference=reference)
        assert int(nib.load(result.outputs[0]).header["intent_code"]) == 1002
        assert (tmp_path / "out" / "case.dseg.tsv").read_text().splitlines() == [
            "index\tname",
            "0\tbackground",
            "1\tliver",
            "2\ttumour",
        ]

    def test_values_the_table_lacks_are_reported(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """Values 3 and 4 have no name: the result lists them (0 is the background); the
        output is written all the same."""
        result = self._convert(tmp_path, make_reference, self._label_map(top=4))
        assert result.labels_missing == (3, 4)
        np.testing.assert_array_equal(_voxels(result.outputs[0]), self._label_map(top=4))

    def test_a_float_output_is_no_label_map(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """Probabilities keep intent none and get no dseg.tsv."""
        result = self._convert(tmp_path, make_reference, np.full((4, 5, 6), 0.5, np.float32))
        assert int(nib.load(result.outputs[0]).header["intent_code"]) == 0
        assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["case.nii.gz"]

    def test_argmax_of_scores_is_a_label_map(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """channels = argmax turns float scores into integers: a label map."""
        scores = np.random.default_rng(0).random((3, 4, 5, 6)).astype(np.float32)
        result = self._convert(tmp_path, make_reference, scores, channels="argmax")
        assert int(nib.load(result.outputs[0]).header["intent_code"]) == 1002
        assert (tmp_path / "out" / "case.dseg.tsv").read_text() == self.DSEG

    def test_vectors_keep_their_intent(self, tmp_path: Path, make_reference: MakeReference) -> None:
        """channels = vector: the output is a vector image (intent 1007), not a label map."""
        result = self._convert(
            tmp_path, make_reference, np.ones((4, 5, 6, 2), np.uint8), channels="vector"
        )
        assert int(nib.load(result.outputs[0]).header["intent_code"]) == 1007
        assert not (tmp_path / "out" / "case.dseg.tsv").exists()

    def test_split_channels_share_one_table(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """Each `_c<N>` output is a label map; one `<stem>.dseg.tsv` names their values."""
        result = self._convert(
            tmp_path, make_reference, np.ones((4, 5, 6, 2), np.uint8), channels="split"
        )
        assert [int(nib.load(path).header["intent_code"]) for path in result.outputs] == [1002] * 2
        assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
            "case.dseg.tsv",
            "case_c0.nii.gz",
            "case_c1.nii.gz",
        ]

    def test_the_sidecar_lists_the_labels(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """With sidecar = true the provenance names the labels too."""
        self._convert(tmp_path, make_reference, self._label_map(), sidecar=True)
        record = json.loads((tmp_path / "out" / "case.json").read_text())
        assert record["labels"] == {"1": "liver", "2": "tumour"}

    def test_rename_numbers_the_table_like_its_output(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """on_conflict = rename with both names taken: case-1.nii.gz and case-1.dseg.tsv."""
        self._convert(tmp_path, make_reference, self._label_map())
        self._convert(tmp_path, make_reference, self._label_map(), on_conflict="rename")
        assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
            "case-1.dseg.tsv",
            "case-1.nii.gz",
            "case.dseg.tsv",
            "case.nii.gz",
        ]

    def test_fail_with_the_table_taken_places_nothing(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """on_conflict = fail and a dseg.tsv in the way: output_conflict, and the output
        this call placed is taken back (all or nothing)."""
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "case.dseg.tsv").write_text("someone else's\n")
        with pytest.raises(ConversionError) as raised:
            self._convert(tmp_path, make_reference, self._label_map(), on_conflict="fail")
        assert raised.value.code is ErrorCode.OUTPUT_CONFLICT
        assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["case.dseg.tsv"]

    def test_a_redo_keeps_the_table_already_named(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """With rename and the journal, converting again adds no `-1` table."""
        reference = make_reference(shape=(4, 5, 6))
        source = _saved(tmp_path / "case.npy", self._label_map())
        out, journal = tmp_path / "out", tmp_path / "journal.json"
        settings = _settings(labels=LABELS, on_conflict="rename")
        for _ in range(2):
            convert_file(source, out, settings=settings, reference=reference, journal=journal)
        assert sorted(path.name for path in out.iterdir()) == ["case.dseg.tsv", "case.nii.gz"]

    def test_a_failure_writing_the_table_leaves_no_output(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """A full disk at the table's write: the error comes through, and the output
        already named is taken back."""
        from niftidrop.steps import hooked

        def full(name: str) -> None:
            if name == "dseg_write":
                raise OSError(28, "No space left on device")

        with hooked(full), pytest.raises(OSError, match="No space left"):
            self._convert(tmp_path, make_reference, self._label_map())
        assert list((tmp_path / "out").iterdir()) == []


# Inputs that take each way through the slabs: copied, copy-free, cast, reduced.
OVERLAP_CASES: dict[str, tuple[Callable[[np.random.Generator], np.ndarray], dict[str, Any]]] = {
    "float32, C order": (lambda rng: rng.random((40, 36, 30)).astype(np.float32), {}),
    "float32, Fortran order": (
        lambda rng: np.asfortranarray(rng.random((40, 36, 30)).astype(np.float32)),
        {},
    ),
    "int16, z y x": (
        lambda rng: rng.integers(-900, 900, (30, 36, 40)).astype(np.int16),
        {"axis_order": "zyx"},
    ),
    "int64 label map narrowed": (lambda rng: rng.integers(0, 5, (40, 36, 30)), {}),
    "bool": (lambda rng: rng.random((40, 36, 30)) > 0.5, {}),
    "float16 channels first, argmax": (
        lambda rng: rng.random((3, 40, 36, 30)).astype(np.float16),
        {"channels": "argmax"},
    ),
    "float64 channels last, keep": (lambda rng: rng.random((40, 36, 30, 2)), {}),
}


class TestOverlappedWriting:
    """Slabs produced while the threads compress the ones before: the same file."""

    @pytest.mark.parametrize("case", list(OVERLAP_CASES))
    def test_same_file_as_the_whole_volume_compressed_at_once(
        self,
        tmp_path: Path,
        make_reference: MakeReference,
        monkeypatch: pytest.MonkeyPatch,
        case: str,
    ) -> None:
        """Written in many small slabs on three threads, each output is byte for byte the
        file of its bytes compressed in one piece on one thread, and holds the values."""
        from niftidrop import slabs, writer
        from niftidrop.arrays import open_input
        from niftidrop.conversion import encode_volume, plan_conversion
        from niftidrop.reference import read_reference

        make, options = OVERLAP_CASES[case]
        array = make(np.random.default_rng(11))
        reference = make_reference(shape=(40, 36, 30))
        source = _saved(tmp_path / "case.npy", array)
        monkeypatch.setattr(slabs, "SLAB_BYTES", 20_000)  # slabs smaller than a block
        monkeypatch.setattr(slabs, "PIECE_BYTES", 8_000)
        monkeypatch.setattr(writer, "THREADED_GZIP_MIN_BYTES", 0)
        settings = _settings(compression_threads=3, **options)
        (output,) = convert_file(
            source, tmp_path / "out", settings=settings, reference=reference
        ).outputs

        opened = open_input(source, npz_key=None, max_input_bytes=1 << 30)
        plan = plan_conversion(
            opened, read_reference(reference), version=niftidrop.__version__, **options
        )
        whole = b"".join(bytes(chunk) for chunk in encode_volume(plan.volumes[0], opened))
        expected = writer.write_file(
            tmp_path / "expected.nii.gz", [whole], compress=True, threads=1
        )
        assert output.read_bytes() == expected.read_bytes()
        stored = _voxels(output)
        wanted = np.moveaxis(array, 0, -1).argmax(-1) if "argmax" in case else array
        if options.get("axis_order") == "zyx":
            wanted = wanted.transpose(2, 1, 0)
        np.testing.assert_array_equal(stored, wanted)
