"""The QC preview (README: Conversion, Preview): orientation, scaling, colours, text."""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from niftidrop import steps
from niftidrop.api import convert_file
from niftidrop.names import is_temp_name
from niftidrop.preview import (
    GAP,
    OPACITY,
    PALETTE,
    PANEL_PIXELS,
    TEXT_LINE,
    Orientation,
    heat_colours,
    label_colour,
    notes_for,
)
from niftidrop.settings import Settings

SIZE = 20  # voxels along each axis of the test volumes
RAS = np.diag([2.0, 2.0, 2.0, 1.0])
LPS = np.diag([-2.0, -2.0, 2.0, 1.0])


def rotation_z(degrees: float) -> np.ndarray:
    """A 2 mm RAS affine turned `degrees` about the superior axis."""
    angle = math.radians(degrees)
    turn = np.eye(4)
    turn[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    return turn @ RAS


def reference(folder: Path, affine: np.ndarray, shape: tuple[int, ...], name: str) -> Path:
    """A reference of zeros (black in the preview) with `affine`."""
    path = folder / name
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), affine), path)
    return path


def left_anterior_superior(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A label-1 blob in the patient's left-anterior-superior octant, found from the
    world coordinates of every voxel (so it is right whatever the affine)."""
    grid = np.indices(shape).reshape(3, -1)
    world = nib.affines.apply_affine(affine, grid.T).T
    centre = nib.affines.apply_affine(affine, (np.array(shape) - 1) / 2)
    x, y, z = (world[axis] - centre[axis] for axis in range(3))
    extent = 2.0 * min(shape) / 2
    blob = (x < -0.3 * extent) & (y > 0.3 * extent) & (z > 0.3 * extent)
    return blob.reshape(shape).astype(np.uint8)


def convert(
    folder: Path, data: np.ndarray, ref: Path | None, **values: Any
) -> tuple[Image.Image, Any]:
    """`data` converted with the preview on; the PNG read back, and the result."""
    source = folder / "case.npy"
    np.save(source, data)
    settings = Settings.from_values(preview=True, fsync=False, **values)
    result = convert_file(source, folder / "out", settings=settings, reference=ref)
    assert result.preview_error is None
    assert result.preview is not None
    image = Image.open(result.preview)
    image.load()
    return image.convert("RGB"), result


def panels(image: Image.Image, widths: list[int], height: int) -> list[np.ndarray]:
    """The three panels of a preview whose panels have these widths and `height`."""
    pixels = np.asarray(image)
    top = pixels.shape[0] - TEXT_LINE - height
    found, left = [], 0
    for width in widths:
        found.append(pixels[top : top + height, left : left + width])
        left += width + GAP
    return found


def axial_panel(folder: Path, data: np.ndarray) -> np.ndarray:
    """The axial panel of `data`'s preview over a black RAS reference of its shape."""
    ref = reference(folder, RAS, data.shape[:3], "ref.nii")
    image, _ = convert(folder, data, ref)
    return panels(image, [PANEL_PIXELS] * 3, PANEL_PIXELS)[0]


def blended(colour: tuple[int, int, int], grey: float = 0.0) -> np.ndarray:
    """A colour laid over `grey` at the preview's opacity, as the PNG stores it."""
    return np.round(grey + OPACITY * (np.array(colour, dtype=np.float64) - grey))


def where(panel: np.ndarray, colour: np.ndarray) -> tuple[float, float]:
    """The mean (row, column) of the pixels of `colour`, as fractions of the panel."""
    rows, cols = np.nonzero(np.all(panel == colour, axis=-1))
    assert rows.size, f"no pixel of colour {colour}"
    return rows.mean() / panel.shape[0], cols.mean() / panel.shape[1]


class TestOrientation:
    @pytest.mark.parametrize(
        ("affine", "name"),
        [(RAS, "ras.nii"), (LPS, "lps.nii"), (RAS, "ras.nii.gz"), (LPS, "lps.nii.gz")],
    )
    def test_left_anterior_superior_lands_right_and_up(
        self, tmp_path: Path, affine: np.ndarray, name: str
    ) -> None:
        """A left-anterior-superior blob: right and top of the axial and coronal panels,
        left (anterior) and top of the sagittal one, for RAS and LPS references alike."""
        shape = (SIZE, SIZE, SIZE)
        ref = reference(tmp_path, affine, shape, name)
        image, _ = convert(tmp_path, left_anterior_superior(affine, shape), ref)
        axial, coronal, sagittal = panels(image, [PANEL_PIXELS] * 3, PANEL_PIXELS)
        red = blended(PALETTE[0])
        row, col = where(axial, red)
        assert row < 0.5 < col  # anterior up, patient left on the image's right
        row, col = where(coronal, red)
        assert row < 0.5 < col  # superior up, patient left on the right
        row, col = where(sagittal, red)
        assert row < 0.5
        assert col < 0.5

    def test_permuted_axes_are_put_back(self, tmp_path: Path) -> None:
        """Voxel axes stored in another order (z, x, y) give the same picture."""
        affine = np.array([[0, 2.0, 0, 0], [0, 0, 2.0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
        shape = (SIZE, SIZE, SIZE)
        ref = reference(tmp_path, affine, shape, "permuted.nii")
        image, _ = convert(tmp_path, left_anterior_superior(affine, shape), ref)
        axial, _, sagittal = panels(image, [PANEL_PIXELS] * 3, PANEL_PIXELS)
        row, col = where(axial, blended(PALETTE[0]))
        assert row < 0.5 < col
        row, col = where(sagittal, blended(PALETTE[0]))
        assert row < 0.5
        assert col < 0.5

    def test_oblique_affine_takes_the_closest_orthogonal_orientation(self, tmp_path: Path) -> None:
        """A 25 degree turn shows as RAS would, and the picture says it is oblique."""
        affine = rotation_z(25.0)
        shape = (SIZE, SIZE, SIZE)
        ref = reference(tmp_path, affine, shape, "oblique.nii")
        image, _ = convert(tmp_path, left_anterior_superior(affine, shape), ref)
        axial, coronal, _ = panels(image, [PANEL_PIXELS] * 3, PANEL_PIXELS)
        for panel in (axial, coronal):
            row, col = where(panel, blended(PALETTE[0]))
            assert row < 0.5 < col
        orientation = Orientation.of(affine)
        assert math.degrees(orientation.obliquity) == pytest.approx(25.0, abs=0.1)
        assert any("oblique (25.0 deg)" in note for note in notes_for(1, True, orientation))

    def test_a_turn_past_45_degrees_swaps_the_closest_axes(self) -> None:
        """Turned 70 degrees, the first voxel axis is closest to anterior."""
        orientation = Orientation.of(rotation_z(70.0))
        assert orientation.voxel_axis(1) == 0
        assert orientation.voxel_axis(0) == 1

    def test_straight_affines_are_not_called_oblique(self) -> None:
        """RAS and LPS affines get no oblique note."""
        for affine in (RAS, LPS):
            assert notes_for(1, True, Orientation.of(affine)) == []


class TestScaling:
    def test_anisotropic_voxels_are_shown_at_physical_size(self, tmp_path: Path) -> None:
        """1 x 1 x 4 mm voxels: the panels are as wide and tall as the volume is in mm,
        and a cube of 8 mm is a square in the coronal panel."""
        shape = (20, 20, 10)
        affine = np.diag([1.0, 1.0, 4.0, 1.0])
        ref = reference(tmp_path, affine, shape, "aniso.nii")
        data = np.zeros(shape, np.uint8)
        data[6:14, 6:14, 4:6] = 3
        image, _ = convert(tmp_path, data, ref)
        short = PANEL_PIXELS // 2  # 20 mm of the longest extent's 40 mm
        assert image.width == 3 * short + 2 * GAP
        _, coronal, sagittal = panels(image, [short] * 3, PANEL_PIXELS)
        rows, cols = np.nonzero(np.all(coronal == blended(PALETTE[2]), axis=-1))
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert height == pytest.approx(width, abs=2)
        assert width == pytest.approx(8 * PANEL_PIXELS / 40, abs=2)
        row, col = where(sagittal, blended(PALETTE[2]))
        assert row == pytest.approx(0.5, abs=0.05)
        assert col == pytest.approx(0.5, abs=0.05)


class TestColours:
    def test_each_label_gets_its_palette_colour(self, tmp_path: Path) -> None:
        """Labels 1, 2 and 13 are drawn in their own colours; 0 is not drawn."""
        data = np.zeros((SIZE, SIZE, SIZE), np.int16)
        data[2:8, 8:12, 8:12] = 1
        data[8:12, 8:12, 8:12] = 2
        data[12:18, 8:12, 8:12] = 13
        axial = axial_panel(tmp_path, data)
        for value in (1, 2, 13):
            where(axial, blended(label_colour(value)))
        assert len({label_colour(value) for value in range(1, 40)}) == 39

    def test_labels_beyond_the_table_get_their_colours(self, tmp_path: Path) -> None:
        """Negative labels and labels of 65536 and more (a panel holding one is coloured
        without the lookup table) are drawn in their own colours, as is a small label."""
        data = np.zeros((SIZE, SIZE, SIZE), np.int32)
        data[2:8, 8:12, 8:12] = -3
        data[8:12, 8:12, 8:12] = 5
        data[12:18, 8:12, 8:12] = 70000
        axial = axial_panel(tmp_path, data)
        for value in (-3, 5, 70000):
            where(axial, blended(label_colour(value)))

    def test_grey_is_windowed_to_the_percentiles(self, tmp_path: Path) -> None:
        """A reference ramp: its brightest 1 % is white, its darkest 1 % black."""
        shape = (SIZE, SIZE, SIZE)
        ramp = np.broadcast_to(np.arange(SIZE, dtype=np.int16)[:, None, None] * 10, shape)
        path = tmp_path / "ramp.nii"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(ramp), RAS), path)
        image, _ = convert(tmp_path, np.zeros(shape, np.uint8), path)
        axial = panels(image, [PANEL_PIXELS] * 3, PANEL_PIXELS)[0]
        # Patient right (x high) on the left: bright at the left edge, dark at the right.
        assert tuple(axial[PANEL_PIXELS // 3, 1]) == (255, 255, 255)
        assert tuple(axial[PANEL_PIXELS // 3, -2]) == (0, 0, 0)

    def test_float_maps_are_a_heat_map(self, tmp_path: Path) -> None:
        """Float values: the hot colour map, scaled to the largest value shown."""
        data = np.zeros((SIZE, SIZE, SIZE), np.float32)
        data[4:16, 4:16, 4:16] = 0.5
        data[8:12, 8:12, 8:12] = 1.0
        axial = axial_panel(tmp_path, data)
        for value in (0.5, 1.0):
            colour = heat_colours(np.array([value]))[0]
            where(axial, blended((int(colour[0]), int(colour[1]), int(colour[2]))))

    def test_heat_colours_run_black_red_yellow_white(self) -> None:
        """The colour map's stops."""
        stops = heat_colours(np.array([0.0, 1 / 3, 2 / 3, 1.0]))
        assert stops.round().tolist() == [
            [0, 0, 0],
            [255, 0, 0],
            [255, 255, 0],
            [255, 255, 255],
        ]


class TestChannels:
    def test_several_channels_are_shown_by_their_argmax(self, tmp_path: Path) -> None:
        """A 4-D output of three class scores: the winning class's colour is drawn."""
        shape = (SIZE, SIZE, SIZE)
        ref = reference(tmp_path, RAS, shape, "ref.nii")
        scores = np.zeros((*shape, 3), np.float32)
        scores[..., 0] = 0.6
        scores[6:14, 6:14, 6:14, 2] = 0.9
        image, result = convert(tmp_path, scores, ref)
        assert result.shape_out == (*shape, 3)
        axial = panels(image, [PANEL_PIXELS] * 3, PANEL_PIXELS)[0]
        row, col = where(axial, blended(PALETTE[1]))
        assert row == pytest.approx(0.5, abs=0.05)
        assert col == pytest.approx(0.5, abs=0.05)
        assert notes_for(3, True, Orientation.of(RAS)) == ["3 channels: their argmax"]

    def test_split_outputs_share_one_preview(self, tmp_path: Path) -> None:
        """channels = "split": one <stem>.png for all the channel outputs."""
        shape = (SIZE, SIZE, SIZE)
        ref = reference(tmp_path, RAS, shape, "ref.nii")
        scores = np.zeros((*shape, 2), np.float32)
        scores[2:6, 2:6, 2:6, 1] = 1.0
        _, result = convert(tmp_path, scores, ref, channels="split")
        assert len(result.outputs) == 2
        assert result.preview == tmp_path / "out" / "case.png"


class TestContent:
    def test_empty_prediction_cuts_through_the_volume_centre(self, tmp_path: Path) -> None:
        """All zeros: a preview of the reference alone, no overlay, said on it."""
        shape = (SIZE, SIZE, SIZE)
        ref = reference(tmp_path, RAS, shape, "ref.nii")
        image, _ = convert(tmp_path, np.zeros(shape, np.uint8), ref)
        for panel in panels(image, [PANEL_PIXELS] * 3, PANEL_PIXELS):
            assert not np.all(panel == blended(PALETTE[0]), axis=-1).any()
        assert "empty prediction: volume centre" in notes_for(1, False, Orientation.of(RAS))

    def test_no_reference_draws_over_black(self, tmp_path: Path) -> None:
        """Without a reference (identity geometry) the prediction is drawn on black."""
        data = np.zeros((SIZE, SIZE, SIZE), np.uint8)
        data[5:15, 5:15, 5:15] = 1
        image, _ = convert(tmp_path, data, None)
        axial = panels(image, [PANEL_PIXELS] * 3, PANEL_PIXELS)[0]
        where(axial, blended(PALETTE[0]))

    def test_text_is_written_above_the_panels(self, tmp_path: Path) -> None:
        """The name and the labels are drawn: the text band holds white pixels."""
        shape = (SIZE, SIZE, SIZE)
        data = np.zeros(shape, np.uint8)
        data[5:15, 5:15, 5:15] = 1
        image, _ = convert(tmp_path, data, reference(tmp_path, RAS, shape, "ref.nii"))
        band = np.asarray(image)[: 2 * TEXT_LINE]
        assert np.all(band == 255, axis=-1).sum() > 50


class TestWriting:
    def test_the_png_never_shows_partial_under_its_name(self, tmp_path: Path) -> None:
        """Until its commit the name does not exist; at the commit the temporary holds the
        whole PNG (a fault at any step leaves no partial file: the fault matrix)."""
        shape = (SIZE, SIZE, SIZE)
        ref = reference(tmp_path, RAS, shape, "ref.nii")
        final = tmp_path / "out" / "case.png"
        seen: list[str] = []

        def hook(name: str) -> None:
            if name.startswith("preview_"):
                seen.append(name)
                assert not final.exists()
                if name == "preview_commit":
                    (temp,) = (p for p in final.parent.iterdir() if is_temp_name(p.name))
                    Image.open(io.BytesIO(temp.read_bytes())).load()

        with steps.hooked(hook):
            convert(tmp_path, np.ones(shape, np.uint8), ref)
        assert seen == ["preview_create", "preview_write", "preview_commit"]
        assert final.exists()

    def test_on_conflict_rename_keeps_an_existing_png(self, tmp_path: Path) -> None:
        """on_conflict = "rename": a taken <stem>.png gets a sibling, as outputs do."""
        shape = (SIZE, SIZE, SIZE)
        ref = reference(tmp_path, RAS, shape, "ref.nii")
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "case.png").write_bytes(b"someone else's")
        _, result = convert(tmp_path, np.ones(shape, np.uint8), ref, on_conflict="rename")
        assert result.preview is not None
        assert result.preview.name != "case.png"
        assert (tmp_path / "out" / "case.png").read_bytes() == b"someone else's"

    def test_an_unreadable_reference_slice_is_reported_not_raised(self, tmp_path: Path) -> None:
        """A reference whose voxels end early: the input converts, preview_error says why."""
        shape = (SIZE, SIZE, SIZE)
        ref = reference(tmp_path, RAS, shape, "short.nii")
        ref.write_bytes(ref.read_bytes()[:1000])  # the header, then almost nothing
        source = tmp_path / "case.npy"
        np.save(source, np.ones(shape, np.uint8))
        settings = Settings.from_values(preview=True, fsync=False)
        result = convert_file(source, tmp_path / "out", settings=settings, reference=ref)
        assert result.outputs == (tmp_path / "out" / "case.nii.gz",)
        assert result.preview is None
        assert result.preview_error
        assert not (tmp_path / "out" / "case.png").exists()


def scan_and_labels(
    shape: tuple[int, int, int], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fixed CT-like int16 scan (a smooth body, noise), a label map of four
    structures (labels 1, 2, 3 and 14) and a float map (a smooth bump) of `shape`."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    x, y, z = ((g - n / 2) / (n / 2) for g, n in zip(grids, shape, strict=True))
    body = x * x / 0.8 + y * y / 0.6 + z * z / 2.0
    rng = np.random.default_rng(seed)
    scan = (400.0 * np.cos(2.0 * body) - 300.0 * x + 120.0 * z).astype(np.int16)
    scan += rng.normal(0.0, 40.0, shape).astype(np.int16)
    labels = np.zeros(shape, np.uint8)
    labels[np.broadcast_to((x - 0.3) ** 2 + y * y + (z - 0.1) ** 2 < 0.12, shape)] = 1
    labels[np.broadcast_to((x + 0.4) ** 2 + (y + 0.2) ** 2 + z * z < 0.04, shape)] = 2
    labels[np.broadcast_to(x * x + (y - 0.5) ** 2 + (z + 0.3) ** 2 < 0.03, shape)] = 3
    labels[np.broadcast_to((x + 0.1) ** 2 + (y + 0.6) ** 2 + (z - 0.4) ** 2 < 0.02, shape)] = 14
    bump = np.broadcast_to(np.exp(-4.0 * (x * x + (y - 0.2) ** 2 + z * z)), shape)
    heat = np.where(bump > 0.2, bump * 3.5, 0.0).astype(np.float32)
    return scan, labels, heat


def pixels_sha256(image: Image.Image) -> str:
    """The SHA-256 of a picture's size and RGB pixels."""
    pixels = np.ascontiguousarray(np.asarray(image))
    return hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()


class TestPinnedPicture:
    """Fixed inputs, pixel for pixel: the checksums are of the pictures drawn before
    the drawing was made cheaper (with Pillow 13), so any change to what a preview
    shows, however small, is seen here first."""

    LPS_ANISO = np.diag([-0.9, -0.9, 2.5, 1.0])

    @pytest.mark.parametrize("name", ["ct.nii", "ct.nii.gz"])
    def test_a_label_map_over_an_lps_anisotropic_scan(self, tmp_path: Path, name: str) -> None:
        """Four labels over a noisy LPS scan of 0.9 x 0.9 x 2.5 mm voxels, the scan
        `.nii` or `.nii.gz`: the picture is the one pinned."""
        scan, labels, _ = scan_and_labels((60, 52, 24), seed=1)
        ref = tmp_path / name
        nib.save(nib.Nifti1Image(scan, self.LPS_ANISO), ref)
        image, _ = convert(tmp_path, labels, ref)
        assert pixels_sha256(image) == LABEL_MAP_SHA256

    def test_a_heat_map_over_a_scaled_oblique_scan(self, tmp_path: Path) -> None:
        """A float map over a scan turned 25 degrees, stored with a slope and an intercept."""
        scan, _, heat = scan_and_labels((40, 44, 30), seed=2)
        ref = tmp_path / "ct.nii"
        image = nib.Nifti1Image(scan, rotation_z(25.0))
        image.header.set_slope_inter(2.0, -100.0)
        nib.save(image, ref)
        image, _ = convert(tmp_path, heat, ref)
        assert pixels_sha256(image) == HEAT_MAP_SHA256

    def test_channels_over_a_permuted_scan(self, tmp_path: Path) -> None:
        """Three class scores (their argmax shown) over a scan stored z, x, y."""
        scan, labels, _ = scan_and_labels((36, 30, 28), seed=3)
        ref = tmp_path / "ct.nii"
        affine = np.array([[0, 1.5, 0, 10], [0, 0, 1.5, -20], [2.0, 0, 0, 5], [0, 0, 0, 1]])
        nib.save(nib.Nifti1Image(scan, affine), ref)
        scores = np.stack([labels == 0, labels == 1, labels >= 2], axis=-1).astype(np.float32)
        image, _ = convert(tmp_path, scores, ref)
        assert pixels_sha256(image) == CHANNELS_SHA256


LABEL_MAP_SHA256 = "ea3019a65741df8648f13a6d49ed244ce45fed11283c1feee618d257bfa46ec4"
HEAT_MAP_SHA256 = "9055c0051de7de57f12599f0b5982dc3238269dac1ccbb3e03d042584dbff701"
CHANNELS_SHA256 = "cf134fd4b87be268729657116621a44e67176ab6bb24602225378a529883a31e"
