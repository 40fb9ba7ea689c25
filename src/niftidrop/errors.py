"""Errors niftidrop raises, each carrying a stable code (README: error codes)."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path


class ErrorCode(StrEnum):
    """Why an input was rejected; the value is what `.error.json` and logs show."""

    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    UNSAFE_INPUT = "unsafe_input"
    UNSUPPORTED_DTYPE = "unsupported_dtype"
    BAD_SHAPE = "bad_shape"
    SHAPE_MISMATCH = "shape_mismatch"
    DTYPE_OVERFLOW = "dtype_overflow"
    NPZ_KEY_MISSING = "npz_key_missing"
    EMPTY_NPZ = "empty_npz"
    TOO_LARGE = "too_large"
    NO_REFERENCE = "no_reference"
    AMBIGUOUS_REFERENCE = "ambiguous_reference"
    BAD_REFERENCE = "bad_reference"
    OUTPUT_CONFLICT = "output_conflict"
    BAD_NAME = "bad_name"
    CONVERSION_CRASHED = "conversion_crashed"


class NiftidropError(Exception):
    """Base class of every error niftidrop raises on purpose."""


class ConfigError(NiftidropError, ValueError):
    """The configuration is invalid. Each of `problems` is one line that says where
    the value came from (a flag, a `NIFTIDROP_*` variable, or the TOML file and key),
    what is allowed and what was found; the message is all of them."""

    def __init__(self, *problems: str) -> None:
        super().__init__(*problems)
        self.problems = problems

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        lines = "".join(f"\n  {problem}" for problem in self.problems)
        return f"{len(self.problems)} problems in the configuration:{lines}"


class ServiceError(NiftidropError):
    """The service cannot run (its conversion processes do not start)."""


class ConversionError(NiftidropError, ValueError):
    """An input was rejected for good: retrying it unchanged gives the same error.

    `code` is one of `ErrorCode`; `reference` and `candidates` are set where a
    reference was involved, so the failed input's `.error.json` can show them.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        reference: Path | None = None,
        candidates: Sequence[Path] = (),
    ) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.reference = reference
        self.candidates = tuple(candidates)

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments need help to survive pickling (worker processes).
        return (_rebuild, (self.code, self.message, self.reference, self.candidates))

    def __repr__(self) -> str:
        return f"ConversionError({self.code.value!r}, {self.message!r})"


def _rebuild(
    code: ErrorCode, message: str, reference: Path | None, candidates: tuple[Path, ...]
) -> ConversionError:
    return ConversionError(code, message, reference=reference, candidates=candidates)
