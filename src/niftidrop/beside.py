"""The files placed beside a conversion's outputs (README: Conversion): the provenance
sidecar `<stem>.json`, the label table `<stem>.dseg.tsv` and the preview `<stem>.png`.

Each is written like an output, under a temporary name, then committed by
`on_conflict`, and recorded in the conversion's journal so that a redo after a
crash recognises it; `niftidrop.api.convert_file` places them once its outputs
have their names.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from niftidrop.arrays import InputArray
from niftidrop.conversion import Plan
from niftidrop.journal import find_own, identity_of, write_journal
from niftidrop.labels import dseg_text, sidecar_labels
from niftidrop.names import DSEG_SUFFIX
from niftidrop.preview import preview_png
from niftidrop.preview_slices import OutputWatch
from niftidrop.reference import Reference, file_sha256, reference_sha256
from niftidrop.settings import Settings
from niftidrop.version import __version__
from niftidrop.writer import Temporary, commit, write_temp


@dataclass(frozen=True)
class Beside:
    """Where the files beside the outputs (the sidecar, the label table) are placed
    from: one conversion's settings, owner, journal and the files it wrote."""

    settings: Settings
    owner: str
    journal: Path | None
    recorded: dict[str, list[int]]
    temps: list[Temporary]
    placed: list[tuple[Path, Temporary]]

    def place(self, path: Path, text: bytes, kind: str) -> Path:
        """Write and name `path`, unless a crashed run of this conversion placed it
        already; `kind` names its steps (`sidecar`, `dseg`). Returns the name given."""
        found = find_own(path, self.recorded.get(path.name))
        if found is not None:
            return found
        settings = self.settings
        temp = write_temp(
            path, [text], compress=False, fsync=settings.fsync, owner=self.owner, kind=kind
        )
        self.temps.append(temp)
        self.recorded[path.name] = identity_of(temp)
        if self.journal is not None:
            write_journal(self.journal, self.recorded, durable=settings.fsync, owner=self.owner)
        given = commit(temp, path, on_conflict=settings.on_conflict, fsync=False, kind=kind)
        self.placed.append((given, temp))
        return given

    def place_all(
        self,
        stem: Path,
        plan: Plan,
        provenance: Mapping[str, object] | None,
        sidecar: Callable[[Mapping[str, object] | None], bytes],
    ) -> dict[str, Path]:
        """The label table (beside a label map), then the sidecar, its text from
        `sidecar(provenance)` (`stem`: the outputs' folder and stem); their names."""
        labels = self.settings.labels
        given = {}
        if plan.label_map and labels is not None:
            table = stem.with_name(stem.name + DSEG_SUFFIX)
            given["dseg"] = self.place(table, dseg_text(labels), "dseg")
            provenance = {"labels": sidecar_labels(labels), **(provenance or {})}
        if self.settings.sidecar:
            given["sidecar"] = self.place(
                stem.with_name(stem.name + ".json"), sidecar(provenance), "sidecar"
            )
        return given


def place_preview(
    path: Path,
    plan: Plan,
    reference: Reference | None,
    array: InputArray,
    *,
    name: str,
    watch: OutputWatch | None,
    place: Callable[..., Path],
    enabled: bool,
) -> tuple[Path | None, str | None]:
    """When `enabled` (settings.preview): render `<stem>.png` and `place` it (as
    `Beside.place` does: on_conflict, the journal); returns its name, or why it could
    not be rendered. A preview that fails to render is reported in the result (the
    service logs `preview_failed`), never raised: it must not fail the input."""
    if not enabled:
        return None, None
    try:
        png = preview_png(plan, reference, name=name, release=array.release_pages, watch=watch)
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"
    return place(path, png, kind="preview"), None


# The conversion settings a sidecar records (README: Conversion).
_SIDECAR_SETTINGS = ("axis_order", "channels", "dtype", "npz_key")


def sidecar_text(
    provenance: Mapping[str, object] | None,
    *,
    source: Path,
    reference: Reference | None,
    plan: Plan,
    outputs: tuple[Path, ...],
    settings: Settings,
) -> bytes:
    """The provenance `<stem>.json`: what went in, what came out, and how (the
    profile, None without one, and the conversion settings it was made with)."""
    record: dict[str, object] = {
        "input": source.name,
        "input_sha256": file_sha256(source),
        "reference": str(reference.path) if reference else None,
        "reference_sha256": reference_sha256(reference.path) if reference else None,
        "rule": None,
        "profile": None,
        "settings": {key: getattr(settings, key) for key in _SIDECAR_SETTINGS},
        "outputs": [output.name for output in outputs],
        "shape_in": list(plan.shape_in),
        "shape_out": list(plan.shape_out),
        "dtype_in": plan.dtype_in.name,
        "dtype_out": plan.dtype_out.name,
        "niftidrop_version": __version__,
        "converted_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    record.update(provenance or {})
    return (json.dumps(record, indent=2, default=str) + "\n").encode()
