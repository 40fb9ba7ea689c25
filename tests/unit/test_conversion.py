"""Array + reference -> NIfTI: geometry, dtype policy, shapes, streaming."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from nibabel.testing import data_path

from niftidrop import conversion, slabs
from niftidrop.arrays import InputArray, open_input
from niftidrop.conversion import (
    Plan,
    arrange,
    encode_volume,
    header_bytes,
    narrowest_integer,
    plan_conversion,
)
from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.reference import _read_header, read_reference

MakeReference = Callable[..., Path]
NIBABEL_DATA = Path(data_path)
GEOMETRY_FIELDS = (
    "qform_code",
    "sform_code",
    "quatern_b",
    "quatern_c",
    "quatern_d",
    "qoffset_x",
    "qoffset_y",
    "qoffset_z",
    "srow_x",
    "srow_y",
    "srow_z",
    "xyzt_units",
    "dim_info",
)


def _memory_input(array: np.ndarray, name: str = "x.npy") -> InputArray:
    return InputArray(path=Path(name), data=array)


def _write(plan: Plan, source: InputArray, folder: Path) -> list[Path]:
    """Write every planned volume as a plain .nii file (no writer involved)."""
    paths = []
    for number, volume in enumerate(plan.volumes):
        path = folder / f"out{number}{volume.suffix}.nii"
        with path.open("wb") as stream:
            for chunk in encode_volume(volume, source):
                stream.write(chunk)
        paths.append(path)
    return paths


def _convert(array: np.ndarray, reference: Path | None, folder: Path, **options: Any) -> list[Any]:
    source = _memory_input(array)
    ref = read_reference(reference) if reference is not None else None
    plan = plan_conversion(source, ref, version="9.9", **options)
    return [nib.load(path) for path in _write(plan, source, folder)]


def _voxels(image: Any) -> np.ndarray:
    return np.asanyarray(image.dataobj)


def _stored_header(path: Path) -> Any:
    """The header as stored in the file (nibabel's loaded header hides the scaling)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as stream:
        return nib.Nifti1Header.from_fileobj(stream)


class TestGeometry:
    @pytest.mark.parametrize(
        "name",
        [
            "anatomical.nii",  # big-endian int16
            "example4d.nii.gz",  # 4-D, extensions, dim_info
            "example_nifti2.nii.gz",  # NIfTI-2, 4-D
            "functional.nii",  # 4-D
            "standard.nii.gz",  # qform_code 0
            "reoriented_anat_moved.nii",  # big-endian float32, oblique
        ],
    )
    def test_nibabel_test_files_keep_their_geometry(self, tmp_path: Path, name: str) -> None:
        """Real references: sform/qform matrices and codes, pixdim, units, class all kept."""
        reference = NIBABEL_DATA / name
        original = nib.load(reference)
        spatial = original.shape[:3]
        data = np.random.default_rng(0).random(spatial).astype(np.float32)
        (image,) = _convert(data, reference, tmp_path)
        header, ref_header = image.header, original.header
        assert type(header) is type(ref_header)
        for field in GEOMETRY_FIELDS:
            np.testing.assert_array_equal(header[field], ref_header[field], err_msg=field)
        np.testing.assert_array_equal(header["pixdim"][:4], ref_header["pixdim"][:4])
        np.testing.assert_array_equal(image.affine, original.affine)
        assert header.endianness == "<"
        assert image.shape == spatial  # a 4-D reference with a 3-D array gives 3-D
        np.testing.assert_array_equal(_voxels(image), data)

    @pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz", "standard.nii.gz"])
    def test_itk_reads_the_same_geometry(self, tmp_path: Path, name: str) -> None:
        """SimpleITK sees the reference's origin, spacing and direction in the output."""
        reference = NIBABEL_DATA / name
        spatial = nib.load(reference).shape[:3]
        _convert(np.zeros(spatial, np.uint8), reference, tmp_path)
        ours = sitk.ReadImage(str(tmp_path / "out0.nii"))
        theirs = sitk.ReadImage(str(reference))
        if theirs.GetDimension() == 4:  # compare the spatial part of a 4-D reference
            size = list(theirs.GetSize())
            theirs = sitk.Extract(theirs, [*size[:3], 0], [0, 0, 0, 0])
        np.testing.assert_allclose(ours.GetOrigin(), theirs.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(ours.GetSpacing(), theirs.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(ours.GetDirection(), theirs.GetDirection(), atol=1e-6)

    def test_big_endian_reference_gives_little_endian_output(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """A byte-swapped reference gives the same geometry, written little-endian."""
        little = make_reference("l.nii", shape=(3, 4, 5))
        big = make_reference("b.nii", shape=(3, 4, 5), big_endian=True)
        assert nib.load(big).header.endianness == ">"
        data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
        (from_big,) = _convert(data, big, tmp_path / "b" if (tmp_path / "b").mkdir() else tmp_path)
        assert from_big.header.endianness == "<"
        np.testing.assert_array_equal(from_big.affine, nib.load(little).affine)
        np.testing.assert_array_equal(
            from_big.header["quatern_b"], nib.load(little).header["quatern_b"]
        )
        np.testing.assert_array_equal(_voxels(from_big), data)

    @pytest.mark.parametrize(("qform_code", "sform_code"), [(0, 2), (1, 0), (0, 0), (1, 4)])
    def test_codes_are_copied_including_zero(
        self, tmp_path: Path, make_reference: MakeReference, qform_code: int, sform_code: int
    ) -> None:
        """qform_code and sform_code are the reference's, also when they are 0."""
        reference = make_reference(qform_code=qform_code, sform_code=sform_code)
        (image,) = _convert(np.zeros((4, 5, 6), np.uint8), reference, tmp_path)
        assert (int(image.header["qform_code"]), int(image.header["sform_code"])) == (
            qform_code,
            sform_code,
        )
        np.testing.assert_array_equal(image.affine, nib.load(reference).affine)

    def test_no_reference_uses_identity_or_affine(self, tmp_path: Path) -> None:
        """Without a reference: identity by default, else the affine given."""
        (identity,) = _convert(np.zeros((2, 3, 4), np.uint8), None, tmp_path)
        np.testing.assert_array_equal(identity.affine, np.eye(4))
        affine = np.diag([0.5, 0.5, 3.0, 1.0])
        (given,) = _convert(np.zeros((2, 3, 4), np.uint8), None, tmp_path, affine=affine)
        np.testing.assert_array_equal(given.affine, affine)
        assert given.header.get_zooms() == (0.5, 0.5, 3.0)

    def test_headers_from_one_affine_are_independent(self) -> None:
        """Changing one affine-based header leaves later ones as nibabel builds them."""
        affine = np.diag([0.5, 0.75, 3.0, 1.0])
        affine[:3, 3] = [1.0, -2.0, 3.5]

        def build(matrix: np.ndarray) -> Any:
            return conversion.output_header(
                None, matrix, (2, 3, 4), np.dtype("u1"), version="1", name="x"
            )

        first = build(affine)
        expected = first.binaryblock
        first.set_sform(np.eye(4))
        first["descrip"] = b"changed"
        build(np.eye(4))
        assert build(affine).binaryblock == expected
        assert build(np.asfortranarray(affine)).binaryblock == expected
        fresh = nib.Nifti1Image(np.zeros((2, 3, 4), np.uint8), affine).header
        for name in (*GEOMETRY_FIELDS, "pixdim", "dim"):
            np.testing.assert_array_equal(build(affine)[name], fresh[name], err_msg=name)

    def test_bad_affine_is_a_value_error(self, tmp_path: Path) -> None:
        """An affine that is not a finite 4x4 matrix is refused."""
        with pytest.raises(ValueError, match="4x4"):
            _convert(np.zeros((2, 2, 2)), None, tmp_path, affine=np.eye(3))


class TestHeaderReset:
    def test_reference_metadata_never_leaks(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """dtype, scl_slope/inter, cal_min/max, intent, extensions and descrip are reset."""
        reference = make_reference(dtype="int16", scaled=True)
        assert _stored_header(reference).get_slope_inter()[0] not in (None, 1.0)
        data = np.random.default_rng(3).random((4, 5, 6)).astype(np.float32)
        (image,) = _convert(data, reference, tmp_path)
        header = _stored_header(tmp_path / "out0.nii")
        assert header.get_data_dtype() == np.float32
        assert header.get_slope_inter() == (None, None)
        assert (header["cal_min"], header["cal_max"]) == (0, 0)
        assert header.get_intent() == ("none", (), "")
        assert header["descrip"].tobytes().rstrip(b"\0") == b"niftidrop 9.9"
        np.testing.assert_array_equal(_voxels(image), data)  # bit-exact, not quantised

    def test_extensions_are_dropped(self, tmp_path: Path) -> None:
        """A reference's header extensions are not copied; vox_offset follows."""
        reference = NIBABEL_DATA / "example4d.nii.gz"
        assert len(nib.load(reference).header.extensions) > 0
        (image,) = _convert(np.zeros((128, 96, 24), np.uint8), reference, tmp_path)
        assert len(image.header.extensions) == 0
        assert int(_stored_header(tmp_path / "out0.nii")["vox_offset"]) == 352
        assert (tmp_path / "out0.nii").stat().st_size == 352 + 128 * 96 * 24

    def test_header_bytes_end_at_vox_offset(self, make_reference: MakeReference) -> None:
        """The encoded header is exactly vox_offset bytes (NIfTI-1 and NIfTI-2)."""
        for nifti2, size in ((False, 352), (True, 544)):
            reference = read_reference(make_reference(f"r{nifti2}.nii", nifti2=nifti2))
            header = conversion.output_header(
                reference, None, (4, 5, 6), np.dtype("u1"), version="1", name="x"
            )
            assert len(header_bytes(header)) == size


class TestDtypePolicy:
    @pytest.mark.parametrize(
        ("values", "policy", "expected"),
        [
            (np.array([0, 1], bool), "auto", "uint8"),
            (np.array([0, 1], bool), "keep", "uint8"),
            (np.array([0, 255], np.int64), "auto", "uint8"),
            (np.array([-1, 255], np.int64), "auto", "int16"),
            (np.array([0, 40_000], np.int64), "auto", "int32"),
            (np.array([0, 2**40], np.int64), "auto", "int64"),
            (np.array([0, 7], np.uint64), "auto", "uint8"),
            (np.array([0, 7], np.int64), "keep", "int64"),
            (np.array([0.5], np.float16), "auto", "float32"),
            (np.array([0.5], np.float16), "keep", "float32"),
            (np.array([0.5], np.float64), "auto", "float64"),
            (np.array([1, 2], np.int8), "auto", "int8"),
            (np.array([1 + 2j], np.complex64), "auto", "complex64"),
            (np.array([1.0, 2.0], np.float64), "int16", "int16"),
            (np.array([3, 4], np.int64), "float32", "float32"),
            (np.array([0, 1], np.uint8), "bool", "uint8"),
        ],
    )
    def test_policy(self, tmp_path: Path, values: np.ndarray, policy: str, expected: str) -> None:
        """auto/keep/explicit give the dtype of README: Conversion, and the values are unchanged."""
        (image,) = _convert(values.reshape(-1, 1, 1), None, tmp_path, dtype=policy)
        assert image.get_data_dtype() == np.dtype(expected)
        np.testing.assert_array_equal(_voxels(image).ravel(), values)

    def test_big_endian_input_is_written_little_endian(self, tmp_path: Path) -> None:
        """A big-endian array keeps its values and is stored little-endian."""
        values = np.arange(6, dtype=">f8").reshape(1, 2, 3)
        (image,) = _convert(values, None, tmp_path)
        assert image.get_data_dtype() == np.dtype("<f8")
        np.testing.assert_array_equal(_voxels(image), values)

    @pytest.mark.parametrize(
        ("values", "policy", "shown"),
        [
            (np.array([0, 256], np.int64), "uint8", "0 to 256"),
            (np.array([-1, 3], np.int16), "uint16", "-1 to 3"),
            (np.array([0.5, 1.0], np.float32), "int16", "0.5 to 1.0"),
            (np.array([np.nan, 1.0], np.float32), "uint8", "non-finite"),
            (np.array([np.inf, 1.0], np.float64), "int32", "non-finite"),
            (np.array([1e300, 1.0], np.float64), "float32", "1e+300"),
            (np.array([2, 0], np.int64), "bool", "0 to 2"),
            (np.array([1 + 1j], np.complex128), "float64", "1j"),
        ],
    )
    def test_values_that_do_not_fit_overflow(
        self, tmp_path: Path, values: np.ndarray, policy: str, shown: str
    ) -> None:
        """An explicit cast that would change a value is DTYPE_OVERFLOW with the range."""
        with pytest.raises(ConversionError) as caught:
            _convert(values.reshape(-1, 1, 1), None, tmp_path, dtype=policy)
        assert caught.value.code is ErrorCode.DTYPE_OVERFLOW
        assert shown in str(caught.value)
        assert policy.replace("bool", "uint8") in str(caught.value)

    def test_float_target_keeps_nan_and_inf(self, tmp_path: Path) -> None:
        """NaN and infinities survive a float64 -> float32 cast (they are representable)."""
        values = np.array([np.nan, np.inf, -np.inf, 1.5])
        (image,) = _convert(values.reshape(-1, 1, 1), None, tmp_path, dtype="float32")
        np.testing.assert_array_equal(_voxels(image).ravel(), values.astype(np.float32))

    def test_narrowest_integer(self) -> None:
        """uint8, then int16, then int32, else the fallback."""
        fallback = np.dtype("int64")
        assert narrowest_integer(0, 255, fallback) == np.uint8
        assert narrowest_integer(-32768, 32767, fallback) == np.int16
        assert narrowest_integer(0, 2**31 - 1, fallback) == np.int32
        assert narrowest_integer(0, 2**31, fallback) == np.int64


class TestShapes:
    S = (4, 5, 6)

    @pytest.mark.parametrize(
        ("shape", "out"),
        [
            ((4, 5, 6), (4, 5, 6)),
            ((4, 5, 6, 3), (4, 5, 6, 3)),
            ((3, 4, 5, 6), (4, 5, 6, 3)),
            ((1, 4, 5, 6), (4, 5, 6)),
            ((1, 4, 1, 5, 6, 1), (4, 5, 6)),
            ((1, 3, 4, 5, 6), (4, 5, 6, 3)),
        ],
    )
    def test_accepted_layouts(self, shape: tuple[int, ...], out: tuple[int, ...]) -> None:
        """S, S+(C,), (C,)+S and singleton axes arrange to S or S+(C,)."""
        data = np.arange(int(np.prod(shape))).reshape(shape)
        view = arrange(data, self.S, "xyz", "x.npy")
        assert view.shape == out
        assert np.shares_memory(view, data)  # a view, never a copy

    def test_channels_first_moves_last(self) -> None:
        """(C,)+S puts channel c of the input at [..., c]."""
        data = np.random.default_rng(0).random((3, *self.S))
        view = arrange(data, self.S, "xyz", "x.npy")
        for channel in range(3):
            np.testing.assert_array_equal(view[..., channel], data[channel])

    def test_zyx_reverses_spatial_axes(self) -> None:
        """axis_order=zyx reads (z, y, x) and (C, z, y, x) arrays."""
        data = np.random.default_rng(0).random(self.S[::-1])
        np.testing.assert_array_equal(arrange(data, self.S, "zyx", "x"), data.transpose(2, 1, 0))
        channels = np.random.default_rng(1).random((2, *self.S[::-1]))
        view = arrange(channels, self.S, "zyx", "x")
        np.testing.assert_array_equal(view[..., 1], channels[1].transpose(2, 1, 0))

    def test_mismatch_names_both_shapes(self) -> None:
        """Anything else is SHAPE_MISMATCH naming the array's and the reference's shapes."""
        with pytest.raises(ConversionError) as caught:
            arrange(np.zeros((4, 6, 5)), self.S, "xyz", "pred.npy", Path("ref.nii.gz"))
        message = str(caught.value)
        assert caught.value.code is ErrorCode.SHAPE_MISMATCH
        assert "(4, 6, 5)" in message
        assert "(4, 5, 6)" in message
        assert "ref.nii.gz" in message
        assert "pred.npy" in message

    def test_zyx_mismatch_shows_the_zyx_shape_wanted(self) -> None:
        """With axis_order=zyx the message shows the shape wanted in z, y, x order."""
        with pytest.raises(ConversionError) as caught:
            arrange(np.zeros((7, 5, 4)), self.S, "zyx", "pred.npy", Path("ref.nii.gz"))
        message = str(caught.value)
        assert "expected shape (6, 5, 4) in z, y, x order" in message
        assert "found (7, 5, 4)" in message
        assert "reversed" not in message

    @pytest.mark.parametrize(
        ("axis_order", "shape", "other"),
        [
            ("xyz", (6, 5, 4), "zyx"),
            ("xyz", (6, 5, 4, 2), "zyx"),
            ("xyz", (2, 1, 6, 5, 4), "zyx"),
            ("zyx", (4, 5, 6), "xyz"),
        ],
    )
    def test_reversed_spatial_axes_hint_at_axis_order(
        self, axis_order: Literal["xyz", "zyx"], shape: tuple[int, ...], other: str
    ) -> None:
        """An array whose spatial shape is the wanted one reversed is told which
        axis_order would fit."""
        with pytest.raises(ConversionError) as caught:
            arrange(np.zeros(shape), self.S, axis_order, "pred.npy", Path("ref.nii.gz"))
        assert caught.value.code is ErrorCode.SHAPE_MISMATCH
        assert f'set axis_order = "{other}"' in str(caught.value)

    @pytest.mark.parametrize(
        ("axis_order", "shape", "other"),
        [
            ("xyz", (6, 5, 4), "zyx"),
            ("xyz", (2, 6, 5, 4), "zyx"),
            ("zyx", (4, 5, 6, 3), "xyz"),
        ],
    )
    def test_the_hinted_axis_order_fits(
        self,
        axis_order: Literal["xyz", "zyx"],
        shape: tuple[int, ...],
        other: Literal["xyz", "zyx"],
    ) -> None:
        """The axis_order a shape_mismatch suggests is one that accepts the array."""
        data = np.zeros(shape)
        with pytest.raises(ConversionError, match=f'set axis_order = "{other}"'):
            arrange(data, self.S, axis_order, "pred.npy", Path("ref.nii.gz"))
        assert arrange(data, self.S, other, "pred.npy").shape[:3] == self.S

    def test_reference_with_singleton_spatial_axis(self) -> None:
        """A 2-D reference (z = 1) accepts a 2-D array."""
        assert arrange(np.zeros((4, 5)), (4, 5, 1), "xyz", "x").shape == (4, 5, 1)

    def test_without_reference_more_than_four_dims_is_bad_shape(self) -> None:
        """Without a reference a 5-D array with a non-singleton 5th axis is BAD_SHAPE."""
        with pytest.raises(ConversionError) as caught:
            arrange(np.zeros((2, 2, 2, 2, 2)), None, "xyz", "x")
        assert caught.value.code is ErrorCode.BAD_SHAPE

    def test_argmax_gives_a_label_map(self, tmp_path: Path, make_reference: MakeReference) -> None:
        """channels=argmax writes the index of the largest channel, as uint8."""
        scores = np.random.default_rng(5).random((3, *self.S)).astype(np.float32)
        (image,) = _convert(scores, make_reference(), tmp_path, channels="argmax")
        assert image.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(_voxels(image), scores.argmax(axis=0))

    def test_keep_gives_four_dimensions(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """channels=keep writes S+(C,)."""
        scores = np.random.default_rng(5).random((*self.S, 2)).astype(np.float32)
        (image,) = _convert(scores, make_reference(), tmp_path, channels="keep")
        assert image.shape == (*self.S, 2)
        np.testing.assert_array_equal(_voxels(image), scores)

    def test_split_gives_one_volume_per_channel(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """channels=split plans one 3-D volume per channel, suffixed _c<N>."""
        scores = np.random.default_rng(5).random((2, *self.S)).astype(np.float32)
        images = _convert(scores, make_reference(), tmp_path, channels="split")
        assert len(images) == 2
        for channel, image in enumerate(images):
            np.testing.assert_array_equal(_voxels(image), scores[channel])


class TestVectorChannels:
    """channels=vector: one image of C-component voxels (x, y, z, 1, C; intent vector)."""

    S = (4, 5, 6)

    def test_nibabel_reads_five_dimensions_with_intent_vector(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """Channels first become dimension 5, dimension 4 is 1, the intent is vector,
        the geometry is the reference's, and every component keeps its values."""
        reference = make_reference(shape=self.S)
        scores = np.random.default_rng(3).random((3, *self.S)).astype(np.float32)
        (image,) = _convert(scores, reference, tmp_path, channels="vector")
        assert image.shape == (*self.S, 1, 3)
        assert image.header.get_intent()[0] == "vector"
        assert list(image.header["dim"][:6]) == [5, *self.S, 1, 3]
        np.testing.assert_array_equal(
            image.header["pixdim"][1:4], nib.load(reference).header["pixdim"][1:4]
        )
        np.testing.assert_array_equal(image.header["pixdim"][4:6], [1.0, 1.0])
        np.testing.assert_array_equal(image.affine, nib.load(reference).affine)
        for channel in range(3):
            np.testing.assert_array_equal(_voxels(image)[..., 0, channel], scores[channel])

    def test_itk_reads_one_image_with_a_component_per_channel(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """SimpleITK reads one 3-D image with C components per voxel, the reference's
        size, origin, spacing and direction, and the channels' values per voxel."""
        reference = make_reference(shape=self.S)
        scores = np.random.default_rng(4).random((*self.S, 4)).astype(np.float32)
        _convert(scores, reference, tmp_path, channels="vector")
        ours = sitk.ReadImage(str(tmp_path / "out0.nii"))
        theirs = sitk.ReadImage(str(reference))
        assert ours.GetDimension() == 3
        assert ours.GetNumberOfComponentsPerPixel() == 4
        assert ours.GetSize() == self.S
        np.testing.assert_allclose(ours.GetOrigin(), theirs.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(ours.GetSpacing(), theirs.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(ours.GetDirection(), theirs.GetDirection(), atol=1e-6)
        # SimpleITK's arrays are (z, y, x, components).
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), scores.transpose(2, 1, 0, 3))

    def test_zyx_arrays_give_the_same_image(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """A (C, z, y, x) array with axis_order=zyx (nnU-Net) gives the same voxels."""
        scores = np.random.default_rng(5).random((2, *self.S)).astype(np.float32)
        reversed_axes = np.ascontiguousarray(scores.transpose(0, 3, 2, 1))
        (image,) = _convert(
            reversed_axes,
            make_reference(shape=self.S),
            tmp_path,
            channels="vector",
            axis_order="zyx",
        )
        assert image.shape == (*self.S, 1, 2)
        np.testing.assert_array_equal(_voxels(image)[..., 0, 1], scores[1])

    def test_an_array_without_channels_stays_three_dimensional(
        self, tmp_path: Path, make_reference: MakeReference
    ) -> None:
        """With no channel axis the output is the plain 3-D image keep would write."""
        data = np.random.default_rng(6).random(self.S).astype(np.float32)
        (image,) = _convert(data, make_reference(shape=self.S), tmp_path, channels="vector")
        assert image.shape == self.S
        assert image.header.get_intent()[0] == "none"

    def test_a_mapped_npy_is_streamed_component_by_component(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A channels-last .npy (C order) is written in many slabs with exact values."""
        monkeypatch.setattr(slabs, "SLAB_BYTES", 1024)
        monkeypatch.setattr(slabs, "PIECE_BYTES", 512)
        data = np.random.default_rng(8).random((12, 10, 8, 3)).astype(np.float32)
        np.save(tmp_path / "p.npy", data)
        source = open_input(tmp_path / "p.npy", npz_key=None, max_input_bytes=1 << 30)
        plan = plan_conversion(source, None, channels="vector")
        chunks = [bytes(chunk) for chunk in encode_volume(plan.volumes[0], source)]
        assert len(chunks) > 3
        body = np.frombuffer(b"".join(chunks[1:]), "<f4").reshape((12, 10, 8, 1, 3), order="F")
        np.testing.assert_array_equal(body[..., 0, :], data)


class TestStreaming:
    @pytest.mark.parametrize("layout", ["C", "F", "zyx"])
    def test_large_npy_is_streamed_in_slabs(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
    ) -> None:
        """A mapped .npy is written in many slabs, pages dropped, values exact."""
        monkeypatch.setattr(slabs, "SLAB_BYTES", 4096)
        monkeypatch.setattr(slabs, "PIECE_BYTES", 1024)
        data = np.random.default_rng(7).random((32, 24, 20)).astype(np.float32)
        stored = np.ascontiguousarray(data.transpose(2, 1, 0)) if layout == "zyx" else data
        path = tmp_path / "a.npy"
        np.save(path, np.asfortranarray(stored) if layout == "F" else stored)
        source = open_input(path, npz_key=None, max_input_bytes=1 << 30)
        released = []
        monkeypatch.setattr(source, "release_pages", lambda: released.append(1))
        axis_order = "zyx" if layout == "zyx" else "xyz"
        plan = plan_conversion(source, None, axis_order=axis_order)
        # Copied: a chunk is valid only until the one after the next is asked for.
        chunks = [bytes(chunk) for chunk in encode_volume(plan.volumes[0], source)]
        assert len(chunks) > 5
        # Sequential layouts use small slabs; C order re-reads the file, so larger ones.
        slab = 4096 if layout != "C" else data.nbytes // slabs.TRANSPOSE_SLAB_FRACTION
        assert max(len(memoryview(chunk)) for chunk in chunks[1:]) <= slab
        assert len(released) >= len(chunks) - 1
        body = b"".join(chunks[1:])
        np.testing.assert_array_equal(
            np.frombuffer(body, "<f4").reshape(data.shape, order="F"), data
        )

    @pytest.mark.parametrize("layout", ["C", "F"])
    def test_a_chunk_stays_valid_until_the_one_after_next_is_asked_for(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
    ) -> None:
        """Two slab buffers take turns: chunk n still holds its bytes while chunk n + 1 is
        produced, so the writer may compress it meanwhile."""
        monkeypatch.setattr(slabs, "SLAB_BYTES", 4096)
        monkeypatch.setattr(slabs, "PIECE_BYTES", 1024)
        data = np.random.default_rng(5).random((32, 24, 20)).astype(np.float32)
        np.save(tmp_path / "a.npy", np.asfortranarray(data) if layout == "F" else data)
        source = open_input(tmp_path / "a.npy", npz_key=None, max_input_bytes=1 << 30)
        plan = plan_conversion(source, None)
        body, held = [], None
        for chunk in encode_volume(plan.volumes[0], source):
            if held is not None:  # read only now, after the next chunk was made
                body.append(bytes(held))
            held = chunk
        body.append(bytes(held or b""))
        assert len(body) > 5
        values = np.frombuffer(b"".join(body[1:]), "<f4").reshape(data.shape, order="F")
        np.testing.assert_array_equal(values, data)

    def test_int64_range_pass_then_narrow_output(self, tmp_path: Path) -> None:
        """auto on a mapped int64 label map scans the values first, then writes uint8."""
        labels = np.random.default_rng(1).integers(0, 4, size=(8, 9, 10))
        path = tmp_path / "labels.npy"
        np.save(path, labels)
        source = open_input(path, npz_key=None, max_input_bytes=1 << 30)
        plan = plan_conversion(source, None)
        assert plan.dtype_out == np.uint8
        (written,) = _write(plan, source, tmp_path)
        np.testing.assert_array_equal(_voxels(nib.load(written)), labels)

    def test_overflow_found_midway_raises(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A value that does not fit, in a late slab, still raises DTYPE_OVERFLOW."""
        monkeypatch.setattr(slabs, "SLAB_BYTES", 64)
        data = np.zeros((4, 4, 8))
        data[..., -1] = 1000
        source = _memory_input(data)
        plan = plan_conversion(source, None, dtype="uint8")
        with pytest.raises(ConversionError):
            for _ in encode_volume(plan.volumes[0], source):
                pass


class TestCachedReference:
    def test_planning_leaves_the_cached_header_alone(self) -> None:
        """Building an output header never changes the cached reference header."""
        reference = read_reference(NIBABEL_DATA / "example4d.nii.gz")
        before = reference.header.binaryblock
        conversion.output_header(
            reference, None, (128, 96, 24), np.dtype("u1"), version="1", name="x"
        )
        assert reference.header.binaryblock == before
        assert len(reference.header.extensions) == 2

    @pytest.mark.parametrize("name", ["example4d.nii.gz", "example_nifti2.nii.gz"])
    def test_converting_twice_gives_the_same_bytes(self, tmp_path: Path, name: str) -> None:
        """Two conversions against one cached reference match and leave its header as read."""
        path = NIBABEL_DATA / name
        reference = read_reference(path)
        as_stored = _read_header(path)
        spatial = reference.spatial_shape
        source = _memory_input(np.arange(np.prod(spatial), dtype=np.int16).reshape(spatial))
        outputs = []
        for run in ("first", "second"):
            assert read_reference(path) is reference
            folder = tmp_path / run
            folder.mkdir()
            plan = plan_conversion(source, reference, version="1")
            outputs.append([output.read_bytes() for output in _write(plan, source, folder)])
        assert outputs[0] == outputs[1]
        assert reference.header.binaryblock == as_stored.binaryblock
        assert [ext.get_content() for ext in reference.header.extensions] == [
            ext.get_content() for ext in as_stored.extensions
        ]


class TestLabelMaps:
    """With label names (`labels=True`), integer outputs are label maps (README: Conversion)."""

    @pytest.mark.parametrize("dtype", ["uint8", "int16", "bool", "int64"])
    def test_integer_outputs_get_the_label_intent(self, tmp_path: Path, dtype: str) -> None:
        """Whole-number and boolean data: intent NIFTI_INTENT_LABEL (1002), as nibabel reads it."""
        (image,) = _convert(np.ones((3, 4, 5), dtype), None, tmp_path, labels=True)
        assert int(image.header["intent_code"]) == 1002
        assert image.header.get_intent()[0] == "label"

    def test_the_plan_says_it_is_a_label_map(self) -> None:
        """`Plan.label_map` tells the writer to add the label table."""
        source = _memory_input(np.ones((3, 4, 5), np.uint8))
        assert plan_conversion(source, None, labels=True).label_map
        assert not plan_conversion(source, None).label_map

    def test_floats_are_no_label_maps(self, tmp_path: Path) -> None:
        """Float data keeps intent none, also with label names."""
        source = _memory_input(np.ones((3, 4, 5), np.float32))
        plan = plan_conversion(source, None, labels=True)
        assert not plan.label_map
        (image,) = _convert(np.ones((3, 4, 5), np.float32), None, tmp_path, labels=True)
        assert int(image.header["intent_code"]) == 0

    def test_a_cast_to_an_integer_dtype_makes_one(self) -> None:
        """`dtype = "uint8"` on float data gives integers: a label map."""
        source = _memory_input(np.ones((3, 4, 5), np.float32))
        assert plan_conversion(source, None, dtype="uint8", labels=True).label_map

    def test_without_label_names_the_intent_stays_none(self, tmp_path: Path) -> None:
        """No `labels`: integer outputs keep intent none, as before."""
        (image,) = _convert(np.ones((3, 4, 5), np.uint8), None, tmp_path)
        assert int(image.header["intent_code"]) == 0
