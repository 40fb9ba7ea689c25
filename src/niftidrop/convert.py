"""One input converted with its reference (README: Reference matching, Conversion).

The one way the service's workers and `niftidrop convert` turn an input into
NIfTI: with the library's match for its name, or with one reference given for
every input. A match without a reference (`missing_reference = identity`) gets
`default_affine`; a match's rule goes into the provenance. The conversion itself
is `niftidrop.api.convert_file` (in the service: the same call in a conversion
process, see `niftidrop.processes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, Unpack

if TYPE_CHECKING:
    import numpy as np

    from niftidrop.api import ConversionResult
    from niftidrop.library import Match
    from niftidrop.settings import Settings


class ConvertFile(Protocol):
    """`niftidrop.api.convert_file`."""

    def __call__(
        self,
        source: Path,
        out_dir: Path,
        *,
        settings: Settings,
        reference: Path | None,
        stem: str | None = None,
        affine: np.ndarray[Any, Any] | None = None,
        provenance: Mapping[str, object] | None = None,
        owner: str = "",
        journal: Path | None = None,
    ) -> Any: ...


class ClaimedOptions(TypedDict, total=False):
    """What the service passes on for a claimed input (see `convert_file`)."""

    stem: str | None  # the original name's stem: the claimed file may have another
    owner: str  # tags its temporary files
    journal: Path | None


def convert_input(
    source: Path,
    out_dir: Path,
    reference: Match | Path,
    *,
    settings: Settings,
    convert_file: ConvertFile | None = None,
    provenance: Mapping[str, object] | None = None,
    **claimed: Unpack[ClaimedOptions],
) -> ConversionResult:
    """Convert `source` into `out_dir` against `reference`: the library's `Match` for
    its name, or a reference file given for it. The other arguments are those of
    `convert_file` (the default converter)."""
    if isinstance(reference, Path):
        path: Path | None = reference
    else:
        path = reference.reference
        provenance = {**(provenance or {}), "rule": reference.rule}
    affine = None
    if path is None and settings.default_affine is not None:
        import numpy as np

        affine = np.asarray(settings.default_affine, dtype=np.float64)
    if convert_file is None:
        from niftidrop.api import convert_file as api_convert_file

        convert_file = api_convert_file
    result: ConversionResult = convert_file(
        source,
        out_dir,
        settings=settings,
        reference=path,
        affine=affine,
        provenance=provenance,
        **claimed,
    )
    return result
