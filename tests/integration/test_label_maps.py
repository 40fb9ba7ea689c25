"""Label names in the running service (README: Conversion, labels; Logs): label maps
get their table and intent, values the table lacks are logged `labels_incomplete`,
and a bad `labels` value stops the start."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from support import SHAPE, ServiceProcess

from niftidrop import drop
from real_command import niftidrop
from waiting import wait_until

DATASET = {"name": "Liver", "labels": {"background": 0, "liver": 1, "tumour": 2}}


def configured(root: Path) -> Path:
    """A TOML file whose `labels` names an nnU-Net dataset.json."""
    dataset = root / "model" / "dataset.json"
    dataset.parent.mkdir()
    dataset.write_text(json.dumps(DATASET))
    config = root / "niftidrop.toml"
    config.write_text(f"labels = {json.dumps(str(dataset))}\n")
    return config


def label_map(top: int) -> np.ndarray:
    return (np.arange(int(np.prod(SHAPE))) % (top + 1)).astype(np.uint8).reshape(SHAPE)


class TestService:
    def test_label_maps_their_table_and_what_it_lacks(
        self, root: Path, start_process: Callable[..., ServiceProcess]
    ) -> None:
        """A real service with a dataset.json: each label map gets intent 1002 and
        `<stem>.dseg.tsv`; one holding values 3 and 4 is logged `labels_incomplete` with
        them, and converted all the same; probabilities get neither."""
        config = configured(root)
        service = start_process(root, "--config", str(config)).wait_ready()
        drop(label_map(2), root / "inbox", "site/case_named.npy")
        drop(label_map(4), root / "inbox", "case_more.npy")
        drop(np.full(SHAPE, 0.25, np.float32), root / "inbox", "case_scores.npy")
        wait_until(lambda: len(service.events("input_converted")) == 3, 60, "conversions")
        incomplete = [
            (event["input"], event["values"], event["level"])
            for event in service.events("labels_incomplete")
        ]
        assert incomplete == [("case_more.npy", [3, 4], "warning")]
        outbox = root / "outbox"
        expected = "index\tname\n0\tbackground\n1\tliver\n2\ttumour\n"
        for stem in ("site/case_named", "case_more"):
            assert int(nib.load(outbox / f"{stem}.nii.gz").header["intent_code"]) == 1002
            assert (outbox / f"{stem}.dseg.tsv").read_text() == expected
        assert int(nib.load(outbox / "case_scores.nii.gz").header["intent_code"]) == 0
        assert not (outbox / "case_scores.dseg.tsv").exists()
        service.send(signal.SIGTERM)
        assert service.wait() == 0

    def test_a_missing_dataset_json_stops_the_start(self, root: Path) -> None:
        """`run` with a labels file that is not there: exit 2, the setting named, nothing run."""
        done = niftidrop("run", "--root", str(root), "--labels", str(root / "dataset.json"))
        assert done.returncode == 2
        assert done.stderr.startswith("niftidrop: flag --labels: expected a table of values")
        assert "dataset.json does not exist" in done.stderr
        assert not (root / "outbox").exists()
