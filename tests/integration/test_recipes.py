"""The recipes of docs/recipes.md, run as the page writes them: its TOML files
written where they say, its `sh` blocks in bash, its `console` blocks compared
line by line, its Python executed against the real package. The arrays are built
the way nnU-Net, MONAI and SimpleITK write them, and every output is checked for
the reference's geometry and the array's values."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from niftidrop.api import numpy_to_nifti
from niftidrop.cli import main

PAGE = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
RECIPES = [
    "nnU-Net v2 probabilities",
    "MONAI",
    "Names that share only a case id: `key_pattern`",
    "SimpleITK arrays",
    "nnU-Net and MONAI in one service",
]
# The page's two base folders, /srv (the spool) and /data (scans and predictions),
# where they begin a path: the tests place them in a temporary folder.
BASE_FOLDER = re.compile(r"(?<![\w./-])/(?=(?:srv|data)/)")
PROMPT = "$ "

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Block:
    """One fenced block of the page."""

    language: str
    text: str
    line: int  # the line of its opening fence


def page_sections() -> dict[str, list[Block]]:
    """The page's fenced blocks by section title (`## ...`), in page order."""
    sections: dict[str, list[Block]] = {}
    title = ""
    opened: tuple[str, int] | None = None
    body: list[str] = []
    for number, line in enumerate(PAGE.read_text().splitlines(), start=1):
        if opened is None and line.startswith("## "):
            title = line[3:].strip()
        elif opened is None and line.startswith("```"):
            opened, body = (line[3:].strip(), number), []
        elif opened is not None and line == "```":
            block = Block(opened[0], "\n".join(body) + "\n", opened[1])
            sections.setdefault(title, []).append(block)
            opened = None
        elif opened is not None:
            body.append(line)
    return sections


class Recipe:
    """One section of the page, its blocks run in page order under `base`.

    Python blocks share one namespace, as cells of a notebook do."""

    def __init__(self, title: str, base: Path) -> None:
        self.title = title
        self.base = base
        self.blocks = list(page_sections()[title])
        self.namespace: dict[str, Any] = {}
        tools = Path(sys.executable).parent
        assert shutil.which("niftidrop", path=str(tools)), f"no niftidrop command in {tools}"
        self.env = {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ.get('PATH', '')}"}

    def __repr__(self) -> str:
        return f"Recipe({self.title!r}, {len(self.blocks)} blocks left)"

    def rebase(self, text: str) -> str:
        """`text` with the page's /srv and /data folders placed under `base`."""
        return BASE_FOLDER.sub(f"{self.base}/", text)

    def path(self, page_path: str) -> Path:
        """Where a path named on the page lies in this test."""
        return Path(self.rebase(page_path))

    def take(self, language: str) -> Block:
        """The section's next block, which must be a `language` block."""
        assert self.blocks, f"{self.title}: expected a {language} block, found no more"
        block = self.blocks.pop(0)
        assert block.language == language, (
            f"{PAGE.name} line {block.line}: expected a {language} block, found {block.language}"
        )
        return block

    def write_toml(self) -> Path:
        """Write the next TOML block to the file its first line names (`# /srv/...`)."""
        text = self.rebase(self.take("toml").text)
        first = text.splitlines()[0]
        assert first.startswith("# /"), f"{self.title}: a TOML block starts with '# <its path>'"
        path = Path(first[2:].strip())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def bash(self, script: str) -> subprocess.CompletedProcess[str]:
        """`script` run by bash (stopping at the first failing command), with the
        package's `niftidrop` command first on PATH."""
        return subprocess.run(
            ["bash", "-e", "-c", script],
            env=self.env,
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=100,
            check=False,
        )

    def run_sh(self) -> str:
        """Run the next sh block; it must succeed. Returns its standard output."""
        block = self.take("sh")
        done = self.bash(self.rebase(block.text))
        assert done.returncode == 0, (
            f"{PAGE.name} line {block.line} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
        return done.stdout

    def run_console(self) -> None:
        """Run each `$` line of the next console block; it must print the lines below it."""
        block = self.take("console")
        commands: list[tuple[str, list[str]]] = []
        for line in self.rebase(block.text).splitlines():
            if line.startswith(PROMPT):
                commands.append((line[len(PROMPT) :], []))
            else:
                assert commands, f"{PAGE.name} line {block.line}: output before any command"
                commands[-1][1].append(line)
        for command, expected in commands:
            done = self.bash(command)
            assert done.stdout.splitlines() == expected, f"{command}\n{done.stderr}"

    def run_python(self, **names: Any) -> dict[str, Any]:
        """Execute the next Python block with `names` defined; returns the namespace."""
        block = self.take("python")
        self.namespace.update(names)
        code = compile(self.rebase(block.text), f"{PAGE}:{block.line}", "exec")
        exec(code, self.namespace)
        return self.namespace

    def done(self) -> None:
        """Every block of the section was run."""
        assert not self.blocks, f"{self.title}: blocks not run: {self.blocks}"


@pytest.fixture
def recipe(tmp_path: Path) -> Callable[[str], Recipe]:
    """`recipe(title)`: that section of the page, its folders under tmp_path."""
    return lambda title: Recipe(title, tmp_path)


def scan_affine(seed: int) -> Array:
    """An oblique, anisotropic scanner affine (rotated about z and x, 0.7 x 0.8 x 2.5 mm)."""
    about_z, about_x = np.deg2rad(12.0 + seed), np.deg2rad(-7.0 - seed)
    rotate_z = np.array(
        [
            [np.cos(about_z), -np.sin(about_z), 0],
            [np.sin(about_z), np.cos(about_z), 0],
            [0, 0, 1],
        ]
    )
    rotate_x = np.array(
        [[1, 0, 0], [0, np.cos(about_x), -np.sin(about_x)], [0, np.sin(about_x), np.cos(about_x)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotate_z @ rotate_x @ np.diag([-0.7, -0.8, 2.5])
    affine[:3, 3] = [118.0 - seed, 96.5 + seed, -41.25 * seed]
    return affine


def write_scan(path: Path, shape: tuple[int, int, int], seed: int) -> Path:
    """A CT-like int16 scan of `shape` (x, y, z), sform and qform coded as a scanner's."""
    values = np.random.default_rng(seed).integers(-1000, 1500, size=shape, dtype=np.int16)
    image = nib.Nifti1Image(values, scan_affine(seed))
    image.set_qform(scan_affine(seed), code=1)
    image.set_sform(scan_affine(seed), code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def softmax(logits: Array) -> Array:
    """Softmax over the first axis (the classes), in float32 as the models give it."""
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    return (shifted / shifted.sum(axis=0, keepdims=True)).astype(np.float32)


def assert_geometry(output: Path, reference: Path) -> Array:
    """`output` has `reference`'s grid and geometry exactly; returns its voxels."""
    made, original = nib.load(output), nib.load(reference)
    assert made.shape[:3] == original.shape[:3]
    assert np.array_equal(made.affine, original.affine)
    for coded in ("get_sform", "get_qform"):
        matrix, code = getattr(made.header, coded)(coded=True)
        expected_matrix, expected_code = getattr(original.header, coded)(coded=True)
        assert code == expected_code
        assert np.array_equal(matrix, expected_matrix)
    assert made.header.get_zooms()[:3] == original.header.get_zooms()[:3]
    assert made.header.get_xyzt_units() == original.header.get_xyzt_units()
    return np.asanyarray(made.dataobj)


def assert_values(voxels: Array, expected: Array) -> None:
    """The same dtype, shape and values, bit for bit."""
    assert voxels.dtype == expected.dtype
    assert voxels.shape == expected.shape
    assert np.array_equal(voxels, expected)


class TestPage:
    def test_every_section_is_a_recipe_run_here(self) -> None:
        """The page holds the recipes tested below and no block outside them, so a
        recipe added to the page fails here until a test runs it."""
        assert list(page_sections()) == RECIPES

    def test_rebasing_moves_only_the_base_folders(self, tmp_path: Path) -> None:
        """/srv and /data are moved where they begin a path, nothing else is."""
        moved = Recipe(RECIPES[0], tmp_path).rebase(
            'library = ["/data/a"] # /srv/spool/x.toml /usr/data/b site/data/c'
        )
        assert moved == f'library = ["{tmp_path}/data/a"] # {tmp_path}/srv/spool/x.toml ' + (
            "/usr/data/b site/data/c"
        )


NNUNET_IMAGES = "/data/nnUNet_raw/Dataset005_Prostate/imagesTs"
# Case, its scan's shape (x, y, z), and a seed for its geometry and values.
NNUNET_CASES = [("prostate_01", (24, 20, 10), 1), ("prostate_02", (18, 22, 8), 2)]
CLASSES = 3


def nnunet_outputs(folder: Path, case: str, shape: tuple[int, int, int], seed: int) -> Array:
    """What `nnUNetv2_predict --save_probabilities` leaves for one case: the .npz with
    `probabilities` (C, Z, Y, X), the .pkl and its own segmentation. Returns the
    probabilities in x, y, z order, (C, X, Y, Z)."""
    logits = np.random.default_rng(seed).normal(size=(CLASSES, *shape))
    probabilities = softmax(logits)
    # nnU-Net's arrays are SimpleITK's: spatial axes reversed, C-contiguous.
    zyx = np.ascontiguousarray(probabilities.transpose(0, 3, 2, 1))
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / f"{case}.npz", probabilities=zyx)
    (folder / f"{case}.pkl").write_bytes(pickle.dumps({"spacing": [2.5, 0.8, 0.7]}))
    segmentation = np.argmax(probabilities, axis=0).astype(np.uint8)
    nib.save(nib.Nifti1Image(segmentation, scan_affine(seed)), folder / f"{case}.nii.gz")
    return probabilities


class TestNnUNet:
    def test_probabilities_become_label_maps_and_probability_images(
        self, recipe: Callable[[str], Recipe]
    ) -> None:
        """nnU-Net's (C, Z, Y, X) `probabilities` find their `_0000` image and become,
        through the spool, label maps of the argmax and, with `convert --channels keep`,
        4-D float32 images (X, Y, Z, C), each on its image's exact geometry."""
        page = recipe(RECIPES[0])
        predictions = page.path("/data/predictions")
        probabilities = {}
        for case, shape, seed in NNUNET_CASES:
            for channel in ("0000", "0001"):  # two modalities, one grid
                write_scan(page.path(f"{NNUNET_IMAGES}/{case}_{channel}.nii.gz"), shape, seed)
            probabilities[case] = nnunet_outputs(predictions, case, shape, seed)
        page.write_toml()
        page.run_console()
        page.run_sh()
        for case, _, _ in NNUNET_CASES:
            reference = page.path(f"{NNUNET_IMAGES}/{case}_0000.nii.gz")
            labels = assert_geometry(page.path(f"/srv/spool/outbox/{case}.nii.gz"), reference)
            assert_values(labels, np.argmax(probabilities[case], axis=0).astype(np.uint8))
            assert np.array_equal(labels, nib.load(predictions / f"{case}.nii.gz").dataobj)
            assert (page.path("/srv/spool/archive") / f"{case}.npz").is_file()
        page.run_sh()
        for case, _, _ in NNUNET_CASES:
            reference = page.path(f"{NNUNET_IMAGES}/{case}_0000.nii.gz")
            kept = assert_geometry(page.path(f"/data/probabilities/{case}.nii.gz"), reference)
            assert_values(kept, np.moveaxis(probabilities[case], 0, -1))
        page.done()

    def test_the_wrong_axis_order_is_refused_with_a_hint(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The same file without `axis_order = "zyx"` is a shape_mismatch that points
        at axis_order, not an image with its axes swapped."""
        case, shape, seed = NNUNET_CASES[0]
        write_scan(tmp_path / "images" / f"{case}_0000.nii.gz", shape, seed)
        nnunet_outputs(tmp_path / "predictions", case, shape, seed)
        argv = ["convert", str(tmp_path / "predictions" / f"{case}.npz")]
        argv += ["--library", str(tmp_path / "images"), "-o", str(tmp_path / "out")]
        assert main([*argv, "--npz-key", "probabilities", "--channels", "argmax"]) == 1
        message = capsys.readouterr().err
        assert "shape_mismatch" in message
        assert 'set axis_order = "zyx"' in message
        assert not (tmp_path / "out" / f"{case}.nii.gz").exists()


class TestMonai:
    def test_channel_first_probabilities_and_int64_labels(
        self, recipe: Callable[[str], Recipe]
    ) -> None:
        """MONAI's (C, X, Y, Z) float32 probabilities and its int64 argmax, dropped by
        the page's producer code, become a 4-D float32 image and a uint8 label map
        with the defaults, on the scan's geometry and with the same values."""
        page = recipe(RECIPES[1])
        shape = (20, 18, 12)
        reference = write_scan(page.path("/data/scans/spleen_12.nii.gz"), shape, seed=3)
        write_scan(page.path("/data/scans/spleen_1.nii.gz"), (12, 18, 20), seed=4)  # not its case
        logits = np.random.default_rng(3).normal(size=(2, *shape)).astype(np.float32)
        probabilities = softmax(logits)
        labels = np.argmax(logits, axis=0)
        assert labels.dtype == np.int64  # as torch.argmax gives it
        page.run_python(probabilities=probabilities, labels=labels, case="spleen_12")
        page.write_toml()
        page.run_sh()
        outbox = page.path("/srv/spool/outbox")
        kept = assert_geometry(outbox / "spleen_12_prob.nii.gz", reference)
        assert_values(kept, np.moveaxis(probabilities, 0, -1))
        label_map = assert_geometry(outbox / "spleen_12_seg.nii.gz", reference)
        assert_values(label_map, labels.astype(np.uint8))
        page.done()

    def test_a_kept_class_axis_of_one_is_dropped(self, tmp_path: Path) -> None:
        """`argmax(dim=0, keepdim=True)` labels, (1, X, Y, Z) int64, give the same
        (X, Y, Z) uint8 label map."""
        shape = (20, 18, 12)
        reference = write_scan(tmp_path / "scans" / "spleen_12.nii.gz", shape, seed=3)
        labels = np.random.default_rng(8).integers(0, 2, size=(1, *shape))
        assert labels.dtype == np.int64
        np.save(tmp_path / "spleen_12_seg.npy", labels)
        written = numpy_to_nifti(
            str(tmp_path / "spleen_12_seg.npy"),
            str(tmp_path / "out"),
            reference_nifti=str(reference),
        )
        assert_values(assert_geometry(Path(written), reference), labels[0].astype(np.uint8))


# Case, the shape of its scan, a seed, and its runs.
RUNS = [("case002", (16, 14, 9), 5, ["r00", "r01"]), ("case003", (13, 16, 7), 6, ["r00"])]


class TestKeyPattern:
    def test_runs_find_their_case_scan_and_not_its_ground_truth(
        self, recipe: Callable[[str], Recipe]
    ) -> None:
        """`case002_r00.npz` has no reference by the default rules; with the page's
        key_pattern each run finds its case's `_ct` scan (the `_gt` file beside it is
        not indexed) and is converted onto it."""
        page = recipe(RECIPES[2])
        arrays: dict[str, Array] = {}
        for case, shape, seed, runs in RUNS:
            write_scan(page.path(f"/data/scans/{case}_ct.nii.gz"), shape, seed)
            write_scan(page.path(f"/data/scans/{case}_gt.nii.gz"), shape, seed)
            for number, run in enumerate(runs):
                generator = np.random.default_rng(seed * 10 + number)
                arrays[f"{case}_{run}"] = generator.integers(0, 4, size=shape, dtype=np.uint8)
                target = page.path(f"/data/runs/{case}_{run}.npz")
                target.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(target, segmentation=arrays[f"{case}_{run}"])
        page.run_console()
        page.write_toml()
        page.run_console()
        page.run_sh()
        for name, array in arrays.items():
            reference = page.path(f"/data/scans/{name.split('_')[0]}_ct.nii.gz")
            voxels = assert_geometry(page.path(f"/srv/spool/outbox/{name}.nii.gz"), reference)
            assert_values(voxels, array)
        page.done()


class TestSimpleITK:
    def test_zyx_arrays_keep_the_image_geometry(self, recipe: Callable[[str], Recipe]) -> None:
        """A mask made on `sitk.GetArrayFromImage` (Z, Y, X) comes out on the image's
        geometry, read back by SimpleITK and by nibabel: with `--axis-order zyx`, and
        transposed through `numpy_to_nifti`."""
        page = recipe(RECIPES[3])
        reference = write_scan(page.path("/data/scans/case001.nii.gz"), (22, 17, 9), seed=7)
        namespace = page.run_python()
        bone: Array = namespace["bone"]
        assert bone.shape == (9, 17, 22)
        assert 0 < bone.sum() < bone.size
        page.run_sh()
        page.run_python()
        page.run_python()  # the page's own checks, with SimpleITK
        for name in ("case001_bone", "case001_bone_xyz"):
            output = page.path(f"/data/masks-nifti/{name}.nii.gz")
            assert_values(assert_geometry(output, reference), bone.T)
        page.done()

    def test_multi_component_arrays_keep_their_channels_last(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A two-component image's array, (Z, Y, X, 2) from SimpleITK, converts with
        `--axis-order zyx` to (X, Y, Z, 2) on the image's geometry."""
        reference = write_scan(tmp_path / "scans" / "case001.nii.gz", (22, 17, 9), seed=7)
        image = sitk.ReadImage(str(reference))
        vector = sitk.Compose(image, sitk.Cast(image > 300, image.GetPixelID()))
        array = sitk.GetArrayFromImage(vector)
        assert array.shape == (9, 17, 22, 2)
        np.save(tmp_path / "case001_pair.npy", array)
        argv = ["convert", str(tmp_path / "case001_pair.npy"), "--axis-order", "zyx"]
        assert main([*argv, "--library", str(tmp_path / "scans"), "-o", str(tmp_path)]) == 0
        capsys.readouterr()
        output = assert_geometry(tmp_path / "case001_pair.nii.gz", reference)
        assert_values(output, array.transpose(2, 1, 0, 3))


class TestTwoModels:
    def test_each_subfolder_converts_by_its_profile(self, recipe: Callable[[str], Recipe]) -> None:
        """nnU-Net's (C, Z, Y, X) probabilities in inbox/nnunet and MONAI's (C, X, Y, Z)
        ones in inbox/monai, converted by one service: the argmax label map on the
        `_0000` image from the nnunet profile's library (not the scan of the same
        case in the top-level library), the 4-D float32 image on MONAI's scan, and
        each sidecar naming its profile."""
        page = recipe(RECIPES[4])
        case, shape, seed = NNUNET_CASES[0]
        image = write_scan(page.path(f"{NNUNET_IMAGES}/{case}_0000.nii.gz"), shape, seed)
        write_scan(page.path(f"/data/scans/{case}.nii.gz"), (5, 5, 5), seed=9)  # another's
        probabilities = nnunet_outputs(page.path("/data/predictions"), case, shape, seed)
        scan_shape = (20, 18, 12)
        scan = write_scan(page.path("/data/scans/spleen_12.nii.gz"), scan_shape, seed=3)
        monai = softmax(np.random.default_rng(3).normal(size=(2, *scan_shape)))
        page.path("/data/monai").mkdir(parents=True)
        np.save(page.path("/data/monai/spleen_12_prob.npy"), monai)
        page.write_toml()
        page.run_console()
        page.run_sh()
        outbox = page.path("/srv/spool/outbox")
        labels = assert_geometry(outbox / "nnunet" / f"{case}.nii.gz", image)
        assert_values(labels, np.argmax(probabilities, axis=0).astype(np.uint8))
        kept = assert_geometry(outbox / "monai" / "spleen_12_prob.nii.gz", scan)
        assert_values(kept, np.moveaxis(monai, 0, -1))
        for folder, stem, profile in (
            ("nnunet", case, "nnunet"),
            ("monai", "spleen_12_prob", "monai"),
        ):
            sidecar = json.loads((outbox / folder / f"{stem}.json").read_text())
            assert sidecar["profile"] == profile
        page.done()
