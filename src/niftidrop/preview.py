"""QC previews (README: Conversion, Preview): a reference and a prediction as one PNG.

Three panels side by side: axial, coronal, sagittal, cut through the centre of
the non-zero prediction (`preview_slices.occupied_centre`; the volume's centre
when it is empty). The reference is grey, windowed to the 1st-99th percentile
of the voxels shown; the prediction is laid over it at 50 % opacity, one colour
per label value (`label_colour`) or, for float maps, a heat map of the
magnitude. Panels are in radiological convention, from the affine: patient
right on the image's left, anterior up in the axial panel, superior up in the
coronal and sagittal ones (anterior on the left in the sagittal one). The voxel
axes are put in that order with nibabel's orientation tools, so an LPS or any
permuted reference is shown the same way as an RAS one; an oblique affine is
shown in its closest orthogonal orientation, and the picture says so. Each
panel is scaled to physical size (mm): one pixel size for all three, bilinear
for the reference and nearest-neighbour for the prediction (labels never blend).

Pillow (the optional extra `niftidrop[preview]`) draws only here, and is imported
only when a preview is drawn (`setting_types` checks at start that it is there): it
resizes the reference panels (bilinear) and writes the text in its own bitmap font.
The PNG file itself is written by `preview_pixels.png_bytes`, with ISA-L.

Drawing touches little more than the pixels shown (`preview_pixels`): the
prediction's labels are picked by nearest neighbour (Pillow's choice of pixels)
before they are converted, only the pixels a label covers are blended, and the
grey window is taken from a regular sample of the slices, read in place and
sorted once. The picture is the same, pixel for pixel, as drawing every voxel
would give.
"""

from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from niftidrop.conversion import Plan
from niftidrop.preview_pixels import nearest, png_bytes, sorted_percentiles
from niftidrop.preview_slices import (
    OutputWatch,
    cut,
    occupied_centre,
    prediction_of,
    reference_slices,
    volume_centre,
)
from niftidrop.reference import SPATIAL, Reference, nib

Array = npt.NDArray[Any]

# The longest side of a panel, in pixels, for the volume's longest physical extent.
PANEL_PIXELS: Final = 256
OPACITY: Final = 0.5
# Labels 1 to 12 (Sasha Trubetskoy's distinct colours, the greys left out).
# Higher values step round the hue circle by the golden angle, so neighbours differ.
PALETTE: Final = tuple(
    (int(code[0:2], 16), int(code[2:4], 16), int(code[4:6], 16))
    for code in [
        "e6194b",  # red
        "3cb44b",  # green
        "0082c8",  # blue
        "ffe119",  # yellow
        "f58230",  # orange
        "911eb4",  # purple
        "46f0f0",  # cyan
        "f032e6",  # magenta
        "d2f53c",  # lime
        "fabed4",  # pink
        "008080",  # teal
        "aa6e28",  # brown
    ]
)
_GOLDEN: Final = (math.sqrt(5) - 1) / 2
# An affine this far (radians) from its closest orthogonal orientation is "oblique".
OBLIQUE_RADIANS: Final = 1e-3
WINDOW_SAMPLE: Final = 65536
GAP: Final = 4  # pixels between panels
TEXT_LINE: Final = 12  # pixels per line of the bitmap font
LETTER: Final = (8, 11)  # the patch behind an edge letter, in pixels
# The text mask's values: left as drawn, black (the letters' patches), white (text).
CLEAR, BLACK, WHITE = 0, 1, 255
LOOKUP_LABELS: Final = 65536  # labels below this are coloured through a table
# Display axes: R (patient left -> right), A (posterior -> anterior), S (inferior -> superior).
_RAS: Final = nib.orientations.axcodes2ornt(("R", "A", "S"))
# Each panel: its name, the world axis it cuts, and the letters at its left/right and top/bottom.
PANELS: Final = (
    ("axial", 2, ("R", "L", "A", "P")),
    ("coronal", 1, ("R", "L", "S", "I")),
    ("sagittal", 0, ("A", "P", "S", "I")),
)


def label_colour(value: int) -> tuple[int, int, int]:
    """The colour of label `value` (not 0): PALETTE for 1-12, golden-angle hues beyond."""
    if 1 <= value <= len(PALETTE):
        return PALETTE[value - 1]
    red, green, blue = colorsys.hsv_to_rgb((value * _GOLDEN) % 1.0, 0.75, 0.95)
    return (round(red * 255), round(green * 255), round(blue * 255))


def heat_colours(fraction: Array) -> Array:
    """The "hot" colour map (black, red, yellow, white) of values in [0, 1], as RGB floats."""
    scaled = 3.0 * np.clip(fraction, 0.0, 1.0)
    return np.clip(np.stack([scaled, scaled - 1.0, scaled - 2.0], axis=-1), 0.0, 1.0) * 255.0


@dataclass(frozen=True)
class Orientation:
    """How voxel axes map to the display's R, A, S axes, and each axis's voxel size."""

    ornt: Array  # nibabel's: per voxel axis, its world axis and direction
    zooms: tuple[float, float, float]  # voxel sizes along R, A, S (mm)
    obliquity: float  # radians from the closest orthogonal orientation

    @classmethod
    def of(cls, affine: Array) -> Orientation:
        ornt = nib.orientations.io_orientation(affine)
        sizes = nib.affines.voxel_sizes(affine)
        zooms = [1.0, 1.0, 1.0]
        for voxel_axis, (world_axis, _) in enumerate(ornt[:SPATIAL]):
            zooms[int(world_axis)] = float(sizes[voxel_axis]) or 1.0
        angles = nib.affines.obliquity(affine)
        return cls(ornt, (zooms[0], zooms[1], zooms[2]), float(np.max(np.abs(angles))))

    def voxel_axis(self, world_axis: int) -> int:
        """The voxel axis that runs closest to `world_axis` (0 R, 1 A, 2 S)."""
        return int(np.flatnonzero(self.ornt[:, 0] == world_axis)[0])

    def panel(self, plane: Array, fixed: int) -> Array:
        """A slice with voxel axis `fixed` cut away, as display rows x columns.

        nibabel reorients it to R, A, S order; then rows run down the second
        remaining world axis (anterior or superior at the top) and columns along
        the first, reversed (patient right, or anterior, on the left).
        """
        volume = np.expand_dims(plane, axis=fixed)
        transform = nib.orientations.ornt_transform(self.ornt, _RAS)
        ras = nib.orientations.apply_orientation(volume, transform)
        world = int(self.ornt[fixed, 0])
        flat: Array = ras[(slice(None),) * world + (0,)]  # a view (np.take would copy)
        return flat.T[::-1, ::-1]


def preview_png(
    plan: Plan,
    reference: Reference | None,
    *,
    name: str,
    release: Callable[[], None] = lambda: None,
    watch: OutputWatch | None = None,
) -> bytes:
    """The PNG preview of a planned conversion's outputs over `reference` (None: black).

    `name` is written on it (the input's name). The centre comes from `watch` when
    the output was written through one (`watch_output`), else from a pass over the
    prediction (`occupied_centre`, calling `release` as it goes). Errors are whatever reading the
    reference or drawing raises: the caller reports them as `preview_failed`.
    """
    prediction = prediction_of(plan.volumes)
    found = occupied_centre(prediction, release) if watch is None else watch.centre()
    at = volume_centre(prediction.shape) if found is None else found
    predicted = cut(prediction.values, at)
    if reference is not None:
        grey = reference_slices(reference.path, at)
    else:
        grey = [np.zeros(part.shape, dtype=np.float32) for part in predicted]
    orientation = Orientation.of(plan.volumes[0].header.get_best_affine())
    notes = notes_for(len(prediction.channels), found is not None, orientation)
    return _draw(orientation, grey, predicted, labels=prediction.labels, lines=[name, *notes])


def notes_for(channels: int, found: bool, orientation: Orientation) -> list[str]:
    """The lines a preview adds under the name and labels: what it chose and why."""
    notes = [f"{channels} channels: their argmax"] if channels > 1 else []
    if not found:
        notes.append("empty prediction: volume centre")
    if orientation.obliquity > OBLIQUE_RADIANS:
        degrees = math.degrees(orientation.obliquity)
        notes.append(f"oblique ({degrees:.1f} deg): closest orthogonal orientation")
    return notes


def _draw(
    orientation: Orientation,
    grey: list[Array],
    predicted: list[Array],
    *,
    labels: bool,
    lines: list[str],
) -> bytes:
    """Compose the panels and the text into one PNG."""
    from PIL import Image, ImageDraw

    window = _window(grey)
    # Display order: rows x columns per panel (see `Orientation.panel`).
    backgrounds, overlays = [], []
    for _, world_axis, _ in PANELS:
        fixed = orientation.voxel_axis(world_axis)
        backgrounds.append(orientation.panel(grey[fixed], fixed))
        overlays.append(orientation.panel(predicted[fixed], fixed))
    # The axial panel is R (columns) x A (rows), the coronal one R x S: their extents.
    counts = (backgrounds[0].shape[1], backgrounds[0].shape[0], backgrounds[1].shape[0])
    extents = [n * zoom for n, zoom in zip(counts, orientation.zooms, strict=True)]
    scale = PANEL_PIXELS / max(extents)
    magnitude = 1.0 if labels else _magnitude(predicted)
    panels, values_shown = [], []
    for (_, world_axis, _), background, overlay in zip(PANELS, backgrounds, overlays, strict=True):
        cols_axis, rows_axis = (axis for axis in range(SPATIAL) if axis != world_axis)
        size = (
            max(1, round(extents[cols_axis] * scale)),
            max(1, round(extents[rows_axis] * scale)),
        )
        grey_values = np.ascontiguousarray(background, dtype=np.float32)
        shown = _resized(grey_values, size, Image.Resampling.BILINEAR)
        # Only the voxels shown are converted: nearest neighbours are picked first.
        values = _as_image_values(nearest(overlay, size), labels)
        values_shown.append(values)
        panels.append(_blend(_greys(shown, window), values, labels, magnitude))
    legend = _legend(values_shown, labels, magnitude)
    lines = [_printable(lines[0]), legend, *(_printable(line) for line in lines[1:])]
    width = sum(panel.shape[1] for panel in panels) + GAP * (len(panels) - 1)
    top = TEXT_LINE * len(lines) + GAP
    height = top + max(panel.shape[0] for panel in panels) + TEXT_LINE
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    left = 0
    for panel in panels:
        canvas[top : top + panel.shape[0], left : left + panel.shape[1]] = panel
        left += panel.shape[1] + GAP
    # The text is drawn on a one-byte mask and copied onto the picture: cheaper than
    # handing the whole RGB picture to Pillow and back.
    mask = Image.new("L", (width, height), CLEAR)
    _write_text(ImageDraw.Draw(mask), panels, lines, top)
    marks = np.asarray(mask)
    canvas[marks == BLACK] = 0
    canvas[marks == WHITE] = 255
    return png_bytes(canvas)


def _window(grey: list[Array]) -> tuple[float, float]:
    """The grey window: the 1st and 99th percentiles of the reference voxels shown."""
    # A regular sample of at most WINDOW_SAMPLE voxels estimates them as well, faster:
    # every step-th voxel of the slices laid end to end, taken from each slice in place.
    total = sum(part.size for part in grey)
    step = max(1, total // WINDOW_SAMPLE)
    picked, before = [], 0
    for part in grey:
        # This slice's voxels on the grid, by their C-order index (what ravel would give),
        # picked in place: a slice read from a memory map need not be C-ordered.
        flat = np.arange(-before % step, part.size, step)
        picked.append(part[np.unravel_index(flat, part.shape)])
        before += part.size
    values = np.concatenate(picked)
    values = values[np.isfinite(values)]
    if not values.size:
        return (0.0, 1.0)
    low, high = sorted_percentiles(np.sort(values), (1.0, 99.0))
    return (low, high if high > low else low + 1.0)


def _greys(values: Array, window: tuple[float, float]) -> Array:
    """Reference values as grey levels 0-255 (float32), through `window`."""
    low, high = window
    level = np.nan_to_num((values - np.float32(low)) * np.float32(1.0 / (high - low)), nan=0.0)
    grey: Array = np.clip(level, 0.0, 1.0) * np.float32(255.0)
    return grey


def _as_image_values(overlay: Array, labels: bool) -> Array:
    """Prediction values as a Pillow-friendly array: int32 labels, float32 magnitudes."""
    if labels:
        if overlay.dtype.kind == "b" or np.can_cast(overlay.dtype, np.int32):
            return overlay.astype(np.int32)
        return overlay.astype(np.int64).clip(-(2**31), 2**31 - 1).astype(np.int32)
    magnitude = np.abs(overlay.real if overlay.dtype.kind == "c" else overlay)
    finite: Array = np.nan_to_num(magnitude.astype(np.float32), nan=0.0, posinf=0.0)
    return finite


def _magnitude(predicted: list[Array]) -> float:
    """The largest magnitude among the prediction voxels shown (heat maps are scaled to it)."""
    largest = max(float(np.max(_as_image_values(part, False), initial=0.0)) for part in predicted)
    return largest or 1.0


def _resized(values: Array, size: tuple[int, int], resample: Any) -> Array:
    from PIL import Image

    mode = "I" if values.dtype == np.int32 else "F"
    image = Image.fromarray(np.ascontiguousarray(values), mode=mode)
    return np.asarray(image.resize(size, resample=resample))


def _blend(grey: Array, values: Array, labels: bool, magnitude: float) -> Array:
    """The grey panel (levels) as RGB with the prediction laid over it at OPACITY."""
    rgb = np.repeat(np.round(grey).astype(np.uint8)[..., None], 3, axis=-1)
    covered = np.flatnonzero(values)  # the pixels drawn over, by their flat index
    if not covered.size:
        return rgb
    drawn = values.reshape(-1)[covered]
    if labels:
        colours = _label_colours(drawn)
    else:
        colours = heat_colours(drawn / np.float32(magnitude)).astype(np.float32)
    # Only the covered pixels are blended (in float32, so the levels are as they were).
    under = grey.reshape(-1)[covered][:, None]
    blended = np.round(under + np.float32(OPACITY) * (colours - under)).astype(np.uint8)
    rgb.reshape(-1, 3)[covered] = blended
    return rgb


def _label_colours(drawn: Array) -> Array:
    """The colour of each label in `drawn` (int32, none 0), as float32 RGB rows."""
    lowest, highest = int(drawn.min()), int(drawn.max())
    if lowest > 0 and highest < LOOKUP_LABELS:
        # A table indexed by the label itself: no sort.
        present = np.flatnonzero(np.bincount(drawn, minlength=highest + 1))
        table = np.zeros((highest + 1, 3), dtype=np.float32)
        table[present] = [label_colour(int(value)) for value in present]
        looked_up: Array = table[drawn]
        return looked_up
    present = np.unique(drawn)
    colours = np.array([label_colour(int(value)) for value in present], dtype=np.float32)
    found: Array = colours[np.searchsorted(present, drawn)]
    return found


def _legend(values: list[Array], labels: bool, magnitude: float) -> str:
    if not labels:
        return f"heat map: 0 to {magnitude:.4g} (magnitude)"
    present = sorted({int(v) for part in values for v in np.unique(part[part != 0])})
    return "labels: " + (" ".join(str(v) for v in present) if present else "none")


def _printable(text: str) -> str:
    """`text` in the bitmap font's characters (ASCII; others become "?")."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)


@functools.cache
def _font() -> Any:
    """Pillow's bitmap font (no font files), loaded once: loading takes a millisecond."""
    from PIL import ImageFont

    return ImageFont.load_default_imagefont()


def _write_text(draw: Any, panels: list[Array], lines: list[str], top: int) -> None:
    """The lines above the panels, each panel's name below it, and its edge letters,
    drawn on the text mask (`draw`): WHITE text, each letter on a BLACK patch."""
    font = _font()
    for number, line in enumerate(lines):
        draw.text((2, number * TEXT_LINE), line, fill=WHITE, font=font)
    left = 0
    for panel, (title, _, (west, east, north, south)) in zip(panels, PANELS, strict=True):
        height, width = panel.shape[:2]
        draw.text((left + 2, top + height), title, fill=WHITE, font=font)
        middle_row, middle_col = top + height // 2 - 4, left + width // 2 - 3
        for letter, x, y in (
            (west, left + 1, middle_row),
            (east, left + width - 8, middle_row),
            (north, middle_col, top + 1),
            (south, middle_col, top + height - 11),
        ):
            # On a black patch: the letters stay legible over bright tissue.
            draw.rectangle((x, y, x + LETTER[0] - 1, y + LETTER[1] - 1), fill=BLACK)
            draw.text((x + 1, y), letter, fill=WHITE, font=font)
        left += width + GAP
