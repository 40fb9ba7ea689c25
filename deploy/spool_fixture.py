"""Inputs and checks for the deployment runs of deploy/ci.sh.

    spool_fixture.py reference DIR       write DIR/case001.nii.gz (an oblique scan)
    spool_fixture.py drop INBOX [UID:GID [MODE]]
                                         write INBOX/case001_pred.npy the way producers
                                         should, owned by UID:GID with MODE (octal)
    spool_fixture.py verify OUTPUT REF   OUTPUT holds the dropped data on REF's grid
    spool_fixture.py drop-many INBOX COUNT [UID:GID]
                                         write COUNT predictions, case001_pred_<n>.npy
    spool_fixture.py verify-many SPOOL COUNT
                                         each of them converted once: its output on
                                         the reference's grid, archived once, and
                                         nothing left in the inbox or claimed
    spool_fixture.py has-event EVENT     stdin is JSON log lines and one has "event": EVENT
    spool_fixture.py scrape URL          URL/metrics counts a converted input, URL/healthz is 200

Each command exits 0 on success and 1 with a message saying what was expected
and what was found.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import nibabel
import numpy as np

# nibabel's functions carry no annotations; its objects are handled as Any here.
nib: Any = nibabel

REFERENCE_NAME = "case001.nii.gz"
PREDICTION_NAME = "case001_pred.npy"
OUTPUT_NAME = "case001_pred.nii.gz"
SHAPE = (12, 10, 6)
# Oblique, anisotropic and shifted, so a lost or identity affine cannot pass.
AFFINE = np.array(
    [
        [0.0, -0.9, 0.1, 120.5],
        [0.8, 0.0, 0.0, -44.25],
        [0.0, 0.05, 2.5, 17.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _prediction(number: int = 0) -> np.ndarray:
    """The same float32 probability map for one `number` on every call."""
    return np.random.default_rng(20240601 + number).random(SHAPE, dtype=np.float32)


def write_reference(folder: Path) -> Path:
    """An int16 scan with the fixture's affine, both sform and qform set."""
    folder.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.zeros(SHAPE, dtype=np.int16), AFFINE)
    image.set_qform(AFFINE, code=1)
    image.set_sform(AFFINE, code=2)
    path = folder / REFERENCE_NAME
    nib.save(image, path)
    path.chmod(0o644)  # the service runs as another user
    return path


def drop_prediction(
    inbox: Path, owner: str = "", mode: int = 0o644, number: int | None = None
) -> Path:
    """Write under a hidden temporary name, then rename in: the producer protocol.

    `owner` ("uid:gid") stands for the producer's user: niftidrop archives an
    input with link(), which the kernel (fs.protected_hardlinks) allows only on
    files it owns or may read and write.
    """
    name = PREDICTION_NAME if number is None else _numbered(number)
    temporary = inbox / f".{name}.tmp"
    with temporary.open("wb") as stream:
        np.save(stream, _prediction(number or 0))
        stream.flush()
        os.fsync(stream.fileno())
    if owner:
        uid, _, gid = owner.partition(":")
        os.chown(temporary, int(uid), int(gid or uid))
    temporary.chmod(mode)
    final = inbox / name
    temporary.rename(final)
    return final


def _numbered(number: int) -> str:
    return PREDICTION_NAME.replace(".npy", f"_{number}.npy")


def verify_many(spool: Path, count: int) -> list[str]:
    """Problems with `count` numbered predictions after their conversion: each
    output holds its prediction on the reference's grid, archive holds each input
    once (no renamed second copy), and the inbox and every claim folder are empty."""
    reference = nib.load(spool / "library" / REFERENCE_NAME)
    problems = []
    for number in range(count):
        output = spool / "outbox" / _numbered(number).replace(".npy", ".nii.gz")
        if not output.exists():
            problems.append(f"{output}: expected an output, found none")
            continue
        image = nib.load(output)
        if not np.allclose(image.affine, reference.affine, atol=1e-5):
            problems.append(f"{output}: expected the reference's affine")
        if not np.array_equal(np.asanyarray(image.dataobj), _prediction(number)):
            problems.append(f"{output}: voxel values differ from prediction {number}")
    archived = sorted(path.name for path in (spool / "archive").iterdir())
    expected = sorted(_numbered(number) for number in range(count))
    if archived != expected:
        problems.append(f"archive: expected the {count} inputs once each, found {archived}")
    inbox = spool / "inbox"
    left = [
        path
        for path in inbox.rglob("*")  # claimed inputs included, not the state's records
        if path.is_file()
        and not path.name.startswith(".")
        and (".niftidrop" not in path.parts or "claimed" in path.parts)
    ]
    if left:
        problems.append(f"expected nothing in the inbox or claimed, found {left}")
    return problems


def verify_output(output: Path, reference: Path) -> list[str]:
    """What is wrong with `output`, compared with the dropped data and `reference`."""
    problems = []
    image = nib.load(output)
    expected_affine = nib.load(reference).affine
    if not np.allclose(image.affine, expected_affine, atol=1e-5):
        problems.append(
            f"{output}: affine expected {expected_affine.tolist()}, found {image.affine.tolist()}"
        )
    data = np.asanyarray(image.dataobj)
    expected = _prediction()
    if data.shape != expected.shape or data.dtype != expected.dtype:
        problems.append(
            f"{output}: expected {expected.dtype}{expected.shape}, found {data.dtype}{data.shape}"
        )
    elif not np.array_equal(data, expected):
        problems.append(f"{output}: voxel values differ from the dropped prediction")
    return problems


def find_event(lines: list[str], event: str) -> list[str]:
    """Problems with the log: a line that is not a JSON record, or no `event`."""
    problems = []
    events = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"log line {number}: expected a JSON object, found {line[:120]!r}")
            continue
        if not isinstance(record, dict) or not {"timestamp", "level", "event"} <= record.keys():
            problems.append(
                f"log line {number}: expected timestamp, level, event in {line[:120]!r}"
            )
            continue
        events.append(record["event"])
    if event not in events:
        problems.append(f"log: expected an {event!r} event, found {events}")
    return problems


def scrape(base_url: str) -> list[str]:
    """Problems with the metrics endpoint after one conversion."""
    from prometheus_client.parser import text_string_to_metric_families

    # Straight to the endpoint, whatever proxy the environment names.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    problems = []
    try:
        with opener.open(f"{base_url}/healthz", timeout=10) as response:
            health = response.status
    except urllib.error.HTTPError as error:
        health = error.code
    if health != 200:
        problems.append(f"{base_url}/healthz: expected 200, found {health}")
    with opener.open(f"{base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    converted = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "niftidrop_inputs_converted_total"
    ]
    if not converted or converted[0] < 1:
        problems.append(
            f"{base_url}/metrics: expected niftidrop_inputs_converted_total >= 1, found {converted}"
        )
    return problems


def main(argv: list[str]) -> int:
    command, *args = argv
    problems: list[str] = []
    if command == "reference":
        print(write_reference(Path(args[0])))
    elif command == "drop":
        owner = args[1] if len(args) > 1 else ""
        mode = int(args[2], 8) if len(args) > 2 else 0o644
        print(drop_prediction(Path(args[0]), owner, mode))
    elif command == "drop-many":
        owner = args[2] if len(args) > 2 else ""
        for number in range(int(args[1])):
            drop_prediction(Path(args[0]), owner, number=number)
    elif command == "verify-many":
        problems = verify_many(Path(args[0]), int(args[1]))
    elif command == "verify":
        problems = verify_output(Path(args[0]), Path(args[1]))
    elif command == "scrape":
        problems = scrape(args[0])
    elif command == "has-event":
        problems = find_event(sys.stdin.read().splitlines(), args[0])
    else:
        problems = [f"unknown command {command!r}; see the module docstring"]
    for problem in problems:
        print(f"spool_fixture: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
