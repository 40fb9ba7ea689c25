"""niftidrop: turn NumPy predictions into NIfTI files with their reference's geometry.

The public API (README: Python API): `numpy_to_nifti` / `nifti_to_numpy`
(nidataset-compatible), `convert_file` and its `ConversionResult`, `drop` (a
producer's atomic write into the inbox), the settings model `Settings`, and the
errors with their codes.
"""

from typing import TYPE_CHECKING, Any

from niftidrop.errors import ConfigError, ConversionError, ErrorCode, NiftidropError
from niftidrop.version import __version__

if TYPE_CHECKING:
    from niftidrop.api import ConversionResult, convert_file, nifti_to_numpy, numpy_to_nifti
    from niftidrop.dropping import drop
    from niftidrop.settings import Settings

# The conversion API and the settings model import numpy, nibabel and pydantic;
# load them on first use so that `import niftidrop` (and every CLI command) stays quick.
_API_NAMES = {"ConversionResult", "convert_file", "nifti_to_numpy", "numpy_to_nifti"}


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        from niftidrop import api

        return getattr(api, name)
    if name == "drop":
        from niftidrop import dropping

        return dropping.drop
    if name == "Settings":
        from niftidrop import settings

        return settings.Settings
    raise AttributeError(f"module 'niftidrop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "ConfigError",
    "ConversionError",
    "ConversionResult",
    "ErrorCode",
    "NiftidropError",
    "Settings",
    "__version__",
    "convert_file",
    "drop",
    "nifti_to_numpy",
    "numpy_to_nifti",
]
