"""The public conversion functions (README: Conversion, Python API).

`convert_file` is what the service and `niftidrop convert` call: one input, the
settings, a reference (or none), atomic outputs. `numpy_to_nifti` and
`nifti_to_numpy` keep the signatures and documented behaviour of nidataset's
functions of the same names, with niftidrop's safety rules.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from niftidrop.arrays import open_input
from niftidrop.beside import Beside, place_preview, sidecar_text
from niftidrop.conversion import encode_volume, plan_conversion
from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.journal import find_own, identity_of, read_journal, write_journal
from niftidrop.labels import LabelCensus
from niftidrop.names import input_stem, nifti_prefix
from niftidrop.preview_slices import watch_output, watched
from niftidrop.reference import nib, read_reference
from niftidrop.settings import Settings
from niftidrop.version import __version__
from niftidrop.writer import (
    Temporary,
    check_free,
    commit,
    discard,
    fsync_folder,
    output_conflict,
    withdraw,
    write_file,
    write_temp,
)

logger = logging.getLogger("niftidrop")

# What the functions take as a path: a `str` or any path-like object (`Path`).
StrPath = str | os.PathLike[str]


@dataclass(frozen=True)
class ConversionResult:
    """What one conversion did: the summary line of `input_converted`."""

    input: Path  # the source path given
    outputs: tuple[Path, ...]  # final output files (several with channels="split")
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]
    dtype_in: str
    dtype_out: str
    bytes_in: int  # input file size
    bytes_out: int  # total bytes of outputs on disk
    seconds: float
    labels_missing: tuple[int, ...] = ()  # values in a label map that `labels` does not name
    # The files placed beside the outputs, by kind: "sidecar", "dseg" (those written).
    beside: Mapping[str, Path] = field(default_factory=dict)
    preview: Path | None = None  # the `<stem>.png` placed (settings.preview)
    preview_error: str | None = None  # why the preview failed (the input converted anyway)


def convert_file(
    source: StrPath,
    out_dir: StrPath,
    *,
    settings: Settings,
    reference: StrPath | None,
    stem: str | None = None,
    affine: npt.NDArray[Any] | None = None,
    provenance: Mapping[str, object] | None = None,
    owner: str = "",
    journal: StrPath | None = None,
) -> ConversionResult:
    """Convert one .npy/.npz into out_dir/<stem>.nii.gz (.nii if not settings.compress;
    <stem>_c<N>.nii.gz per channel with channels="split"; optional <stem>.json sidecar
    with settings.sidecar; <stem>.dseg.tsv beside a label map with settings.labels; a
    <stem>.png preview with settings.preview, whose failure is reported in the result's
    preview_error, not raised). stem defaults to the source's stem (the spool passes
    the original name's stem because the claimed file has another name). reference=None means
    no reference: use `affine` (or identity). on_conflict handled here (overwrite = atomic
    replace, rename = unique suffix before the extension, fail = ConversionError
    OUTPUT_CONFLICT). provenance: extra fields for the sidecar (e.g. {"input": "sub/a.npz",
    "rule": "exact"}). owner: tags the temporary names (see `niftidrop.writer`), so the
    service can find and remove those of a conversion that died. Raises ConversionError
    for every rejection (the README's error codes; an unreadable reference is BAD_REFERENCE)
    and lets OSError through for environmental problems (disk full, read-only outbox):
    the service retries those. journal (on_conflict rename or fail only): a file in
    which the inodes of the outputs are recorded before they get their names, so a
    redo after a crash recognises its own outputs instead of adding a second name or
    reporting a conflict with them. Every path may be a `str` or a `Path`."""
    started = time.perf_counter()
    source, out_dir = Path(source), Path(out_dir)
    reference = Path(reference) if reference is not None else None
    stem = stem or input_stem(source.name)
    extension = ".nii.gz" if settings.compress else ".nii"
    ref = read_reference(reference, input_name=source.name) if reference is not None else None
    # A preview reads slices of the input after the output is written: a `.npz`
    # member is then read whole rather than streamed.
    array = open_input(
        source,
        npz_key=settings.npz_key,
        max_input_bytes=settings.max_input_bytes,
        streamed=not settings.preview,
    )
    plan = plan_conversion(
        array,
        ref,
        affine=affine,
        dtype=settings.dtype,
        axis_order=settings.axis_order,
        channels=settings.channels,
        version=__version__,
        labels=settings.labels is not None,
    )
    census = LabelCensus(settings.labels) if plan.label_map and settings.labels else None
    finals = [out_dir / f"{stem}{volume.suffix}{extension}" for volume in plan.volumes]
    # None with overwrite: a redo writes the same bytes under the same names.
    journal = None if journal is None or settings.on_conflict == "overwrite" else Path(journal)
    recorded = read_journal(journal)
    # Outputs a crashed earlier run of this conversion placed already: kept as they are.
    done = {final: find_own(final, recorded.get(final.name)) for final in finals}
    if settings.on_conflict == "fail":
        # Before the work; checked again once it is done.
        check_free([final for final in finals if done[final] is None], source.name)
    temps: list[Temporary] = []
    placed: list[tuple[Path, Temporary]] = []
    # With a preview, the centre of the prediction is found as the output is written.
    watch = watch_output(plan) if settings.preview else None
    beside = Beside(settings, owner, journal, recorded, temps, placed)
    outputs_found: dict[Path, Path] = {}
    try:
        # All or nothing: every output is complete on disk and every final name is
        # checked before the first one is given; a failure takes back what this
        # call placed.
        outputs_found.update({final: path for final, path in done.items() if path is not None})
        for volume, final in zip(plan.volumes, finals, strict=True):
            if final not in outputs_found:
                chunks = encode_volume(volume, array)
                temp = write_temp(
                    final,
                    watched(
                        chunks if census is None else census.watch(chunks, volume.dtype), watch
                    ),
                    compress=settings.compress,
                    level=settings.compression_level,
                    threads=settings.threads,
                    fsync=settings.fsync,
                    size=volume.data_bytes,
                    owner=owner,
                )
                temps.append(temp)
                recorded[final.name] = identity_of(temp)
        array.verify()  # a streamed member's size and CRC, if no output read to its end
        pending = [final for final in finals if final not in outputs_found]
        if settings.on_conflict == "fail":
            check_free(pending, source.name)
        if journal is not None and pending:
            write_journal(journal, recorded, durable=settings.fsync, owner=owner)
        # The folder is fsync'ed once, after the last name is given.
        for temp, final in zip(temps, pending, strict=True):
            given = _commit(temp, final, settings=settings, input_name=source.name)
            placed.append((given, temp))
            outputs_found[final] = given
        outputs = tuple(outputs_found[final] for final in finals)
        preview, preview_error = place_preview(
            out_dir / f"{stem}.png",
            plan,
            ref,
            array,
            name=str((provenance or {}).get("input", source.name)),
            watch=watch,
            place=beside.place,
            enabled=settings.preview,
        )
        sidecar = functools.partial(
            sidecar_text,
            source=source,
            reference=ref,
            plan=plan,
            outputs=outputs,
            settings=settings,
        )
        placed_beside = beside.place_all(out_dir / stem, plan, provenance, sidecar)
        if settings.fsync:
            fsync_folder(out_dir)
    except BaseException:
        for output, temp in placed:
            withdraw(output, temp)
        raise
    finally:
        for temp in temps:
            discard(temp.path)
        del array
    return ConversionResult(
        input=source,
        outputs=outputs,
        shape_in=plan.shape_in,
        shape_out=plan.shape_out,
        dtype_in=plan.dtype_in.name,
        dtype_out=plan.dtype_out.name,
        bytes_in=source.stat().st_size,
        # From the temporaries' descriptors: a consumer may have taken the outputs away.
        bytes_out=sum(recorded[final.name][2] for final in finals),
        seconds=time.perf_counter() - started,
        labels_missing=() if census is None else census.missing(),
        beside=placed_beside,
        preview=preview,
        preview_error=preview_error,
    )


def _commit(temp: Temporary, final: Path, *, settings: Settings, input_name: str) -> Path:
    """`commit` without the folder fsync (done once for all outputs), with an output
    conflict (a file that appeared since the check) naming the input too."""
    try:
        return commit(temp, final, on_conflict=settings.on_conflict, fsync=False)
    except ConversionError as error:
        if error.code is not ErrorCode.OUTPUT_CONFLICT:
            raise
        raise output_conflict(final, input_name) from None


# The nidataset-compatible functions (README: Python API).


def _api_settings() -> Settings:
    """Defaults only: the Python API does not read NIFTIDROP_* or a TOML file."""
    return Settings.model_construct()


def _report_saved(message: str, path: str) -> None:
    """`debug=True`: `message` with the path on the `niftidrop` logger at INFO, or on
    stderr where that logger would show nothing (logging not configured, or set
    above INFO): the caller asked to see it."""
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        logger.info(message, path)
    else:
        print(message % path, file=sys.stderr)


def numpy_to_nifti(
    npy_path: StrPath,
    output_path: StrPath,
    affine: np.ndarray[Any, Any] | None = None,
    reference_nifti: StrPath | None = None,
    debug: bool = False,
) -> str:
    """Convert a `.npy` / `.npz` file to `<output_path>/<prefix>.nii.gz`; returns its path.

    `reference_nifti` supplies the geometry and overrides `affine`; without either
    the affine is the identity. Raises FileNotFoundError for a missing input and
    ConversionError (a ValueError) with an error code (README: Error codes) for a
    rejected one. `debug=True` shows "NIfTI file saved at: '<path>'": on the
    `niftidrop` logger (INFO) when logging shows it, else on stderr.
    """
    source = Path(npy_path)
    if not source.is_file():
        raise FileNotFoundError(f"File not found: '{npy_path}'")
    out_dir = Path(output_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = Path(reference_nifti) if reference_nifti is not None else None
    result = convert_file(
        source,
        out_dir,
        settings=_api_settings(),
        reference=reference,
        affine=None if reference is not None else affine,
    )
    written = str(result.outputs[0])
    if debug:
        _report_saved("NIfTI file saved at: '%s'", written)
    return written


def nifti_to_numpy(
    nii_path: StrPath, output_path: StrPath, compressed: bool = True, debug: bool = False
) -> str:
    """Save a NIfTI image's voxels as `<prefix>.npz` (key `data`), or `.npy`.

    The stored dtype and values are kept, so converting back with the same file as
    reference gives the same image. An image with a scale factor is saved scaled,
    in the floating type nibabel chooses. `debug=True` shows the path written, as
    `numpy_to_nifti` does.
    """
    source = Path(nii_path)
    if not source.is_file():
        raise FileNotFoundError(f"File not found: '{nii_path}'")
    out_dir = Path(output_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    image = nib.load(source)
    data = np.asanyarray(image.dataobj)  # unscaled images keep their on-disk dtype
    prefix = nifti_prefix(source.name)
    final = out_dir / f"{prefix}{'.npz' if compressed else '.npy'}"
    chunks = _npz_bytes(data) if compressed else _npy_bytes(data)
    written = str(write_file(final, chunks, compress=False, on_conflict="overwrite"))
    if debug:
        _report_saved("NumPy file saved at: '%s'", written)
    return written


def _npy_bytes(data: npt.NDArray[Any]) -> Iterator[bytes]:
    import io

    stream = io.BytesIO()
    np.save(stream, data, allow_pickle=False)
    yield stream.getvalue()


def _npz_bytes(data: npt.NDArray[Any]) -> Iterator[bytes]:
    import io

    stream = io.BytesIO()
    np.savez_compressed(stream, data=data)
    yield stream.getvalue()
