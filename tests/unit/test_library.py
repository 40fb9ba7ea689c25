"""Tests of the reference library: index, lookups, waiting and live updates (README:
Reference matching)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from watchdog.events import FileSystemEvent

from niftidrop.errors import ConversionError, ErrorCode
from niftidrop.library import Match, ReferenceLibrary
from niftidrop.reference_index import ChangeHandler, ReferenceScanner
from niftidrop.settings import load_settings
from waiting import wait_until

DEADLINE = 20.0  # seconds a live update may take before a test gives up


def touch(folder: Path, *names: str) -> list[Path]:
    """Empty files named `names` under `folder` (the index reads names only)."""
    created = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        created.append(path)
    return created


def library_of(folder: Path, *names: str, **options: object) -> ReferenceLibrary:
    """A built library over `folder` holding the references `names`."""
    folder.mkdir(parents=True, exist_ok=True)
    touch(folder, *names)
    library = ReferenceLibrary([folder], **options)  # type: ignore[arg-type]
    library.build()
    return library


def matches(library: ReferenceLibrary, name: str, expected: Path | None) -> bool:
    """Whether `name` currently resolves to `expected` (None: to nothing)."""
    try:
        return library.match(name).reference == expected
    except ConversionError:
        return expected is None


@pytest.fixture
def started() -> Iterator[list[ReferenceLibrary]]:
    """Libraries appended here are stopped after the test, even when it fails."""
    libraries: list[ReferenceLibrary] = []
    yield libraries
    for library in libraries:
        library.stop()


class TestIndex:
    def test_recursive_and_counted(self, tmp_path: Path) -> None:
        """Subfolders are indexed, and len() counts references."""
        library = library_of(tmp_path, "x/y/deep.nii.gz", "top.nii", "notes.txt", "a.npz")
        assert len(library) == 2
        assert library.match("deep.npz").reference == tmp_path / "x" / "y" / "deep.nii.gz"

    def test_hidden_and_temporary_names_skipped(self, tmp_path: Path) -> None:
        """Hidden files, hidden folders and temporary names are not references."""
        library = library_of(
            tmp_path, ".hidden.nii.gz", ".cache/inside.nii.gz", "a.nii.gz.part", "b.nii.tmp"
        )
        assert len(library) == 0

    def test_symlinked_folder_followed_once(self, tmp_path: Path) -> None:
        """A symlinked folder is indexed; a link back to an ancestor does not loop."""
        touch(tmp_path, "elsewhere/linked.nii.gz")
        library_dir = tmp_path / "library"
        library_dir.mkdir()
        (library_dir / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        (library_dir / "loop").symlink_to(library_dir, target_is_directory=True)
        touch(library_dir, "own.nii")
        library = ReferenceLibrary([library_dir])
        library.build()
        assert len(library) == 2
        assert library.match("linked.npz").reference == library_dir / "link" / "linked.nii.gz"

    def test_nested_library_folders_index_files_once(self, tmp_path: Path) -> None:
        """A library folder inside another is not indexed twice (no false ambiguity)."""
        touch(tmp_path, "sub/inner.nii")
        library = ReferenceLibrary([tmp_path, tmp_path / "sub"])
        library.build()
        assert len(library) == 1
        assert library.match("inner.npy").rule == "exact"

    def test_missing_folder_is_an_empty_library(self, tmp_path: Path) -> None:
        """A library folder that does not exist indexes nothing instead of failing."""
        library = ReferenceLibrary([tmp_path / "absent"])
        library.build()
        assert len(library) == 0

    def test_lookups_never_touch_the_disk(self, tmp_path: Path) -> None:
        """After build, a match is answered from memory even if the file has gone."""
        library = library_of(tmp_path, "case001.nii.gz")
        (tmp_path / "case001.nii.gz").unlink()
        assert library.match("case001.npz").reference == tmp_path / "case001.nii.gz"

    def test_build_replaces_the_index(self, tmp_path: Path) -> None:
        """A second build reflects the disk as it is now."""
        library = library_of(tmp_path, "old.nii.gz")
        (tmp_path / "old.nii.gz").rename(tmp_path / "new.nii.gz")
        library.build()
        assert len(library) == 1
        assert matches(library, "old.npz", None)
        assert matches(library, "new.npz", tmp_path / "new.nii.gz")

    def test_rescan_updates_changed_folders(self, tmp_path: Path) -> None:
        """rescan() adds, removes and forgets references of changed or vanished folders."""
        library = library_of(tmp_path, "keep/a.nii", "gone/b.nii", "edit/c.nii")
        (tmp_path / "edit" / "c.nii").rename(tmp_path / "edit" / "d.nii")
        (tmp_path / "gone" / "b.nii").unlink()
        (tmp_path / "gone").rmdir()
        touch(tmp_path, "new/e.nii")
        library.rescan()
        assert len(library) == 3
        indexed = {key for key in "abcde" if not matches(library, f"{key}.npy", None)}
        assert indexed == {"a", "d", "e"}

    def test_rescan_skips_unchanged_folders(self, tmp_path: Path) -> None:
        """rescan() does not list a folder whose mtime is old and unchanged; build() does."""
        library_dir = tmp_path / "library"
        library_dir.mkdir()
        past = time.time_ns() - 3600 * 10**9
        os.utime(library_dir, ns=(past, past))
        library = library_of(library_dir)
        touch(library_dir, "sneaked.nii")
        os.utime(library_dir, ns=(past, past))  # as if the folder had not changed
        library.rescan()
        assert len(library) == 0
        library.build()
        assert len(library) == 1

    def test_from_settings(self, tmp_path: Path) -> None:
        """from_settings takes the folders and matching settings of the settings model."""
        settings = load_settings(root=tmp_path, library=["refs"], separators="-", reference_wait=2)
        library = ReferenceLibrary.from_settings(settings)
        assert library.folders == (tmp_path / "refs",)
        assert library.separators == "-"
        assert library.reference_wait == 2


class TestResolve:
    def test_identity_when_missing(self, tmp_path: Path) -> None:
        """missing_reference=identity resolves an unmatched name without a reference."""
        library = library_of(tmp_path, missing_reference="identity")
        assert library.resolve("lonely_pred.npz") == Match(
            "lonely_pred.npz", "lonely_pred", None, "identity", ()
        )

    def test_fail_when_missing(self, tmp_path: Path) -> None:
        """missing_reference=fail raises no_reference."""
        library = library_of(tmp_path)
        with pytest.raises(ConversionError) as raised:
            library.resolve("lonely.npz")
        assert raised.value.code is ErrorCode.NO_REFERENCE

    def test_ambiguity_is_never_identity(self, tmp_path: Path) -> None:
        """An ambiguous key fails even with missing_reference=identity."""
        library = library_of(tmp_path, "x.nii", "x.nii.gz", missing_reference="identity")
        with pytest.raises(ConversionError) as raised:
            library.resolve("x.npy")
        assert raised.value.code is ErrorCode.AMBIGUOUS_REFERENCE

    def test_no_wait_without_watching(self, tmp_path: Path) -> None:
        """Not started, nothing can update the index, so resolve does not wait."""
        library = library_of(tmp_path, reference_wait=3600.0)
        with pytest.raises(ConversionError):
            library.resolve("late.npz")

    def test_wait_is_woken_by_the_reference(
        self, tmp_path: Path, started: list[ReferenceLibrary]
    ) -> None:
        """A resolve waiting for a missing reference returns once it appears in the library."""
        library = library_of(tmp_path, reference_wait=3600.0)
        library.start()
        started.append(library)
        results: list[Match] = []
        waiter = threading.Thread(target=lambda: results.append(library.resolve("late.npz")))
        waiter.start()
        touch(tmp_path, "late.nii.gz")
        wait_until(lambda: not waiter.is_alive(), DEADLINE, "resolve returning")
        assert results[0].reference == tmp_path / "late.nii.gz"

    def test_stop_releases_waiters(self, tmp_path: Path, started: list[ReferenceLibrary]) -> None:
        """stop() ends a pending wait instead of leaving it for the whole reference_wait."""
        library = library_of(tmp_path, reference_wait=3600.0)
        library.start()
        started.append(library)
        errors: list[ConversionError] = []

        def wait_for_reference() -> None:
            try:
                library.resolve("never.npz")
            except ConversionError as error:
                errors.append(error)

        waiter = threading.Thread(target=wait_for_reference)
        waiter.start()
        library.stop()
        wait_until(lambda: not waiter.is_alive(), DEADLINE, "resolve giving up")
        assert errors[0].code is ErrorCode.NO_REFERENCE


class TestLiveUpdates:
    @pytest.mark.parametrize("observer", ["inotify", "polling"])
    def test_add_remove_rename(
        self, tmp_path: Path, observer: str, started: list[ReferenceLibrary]
    ) -> None:
        """References added, removed and renamed while started are seen."""
        library = library_of(tmp_path, "gone.nii.gz", observer=observer, poll_interval=0.1)
        library.start()
        started.append(library)
        (added,) = touch(tmp_path, "sub/added.nii.gz")
        wait_until(lambda: matches(library, "added.npz", added), DEADLINE, "an added reference")
        (tmp_path / "gone.nii.gz").unlink()
        wait_until(lambda: matches(library, "gone.npz", None), DEADLINE, "a removed reference")
        renamed = tmp_path / "sub" / "renamed.nii"
        added.rename(renamed)
        wait_until(
            lambda: matches(library, "renamed.npz", renamed), DEADLINE, "a renamed reference"
        )
        assert matches(library, "added.npz", None)
        assert len(library) == 1

    @pytest.mark.parametrize("observer", ["inotify", "polling"])
    def test_library_below_a_hidden_folder(
        self, tmp_path: Path, observer: str, started: list[ReferenceLibrary]
    ) -> None:
        """A hidden folder above the library (`~/.local/...`) hides none of its references
        from the walk or the watch; hidden names inside it stay out."""
        folder = tmp_path / ".local" / "library"
        library = library_of(folder, "old.nii.gz", observer=observer, poll_interval=0.1)
        library.start()
        started.append(library)
        touch(folder, ".cache/hidden.nii.gz")
        (added,) = touch(folder, "sub/added.nii.gz")
        wait_until(lambda: matches(library, "added.npz", added), DEADLINE, "an added reference")
        assert matches(library, "old.npz", folder / "old.nii.gz")
        assert matches(library, "hidden.npz", None)

    def test_folders_moved_in_and_out(
        self, tmp_path: Path, started: list[ReferenceLibrary]
    ) -> None:
        """A folder of references moved into the library is indexed; moved out, forgotten."""
        library = library_of(tmp_path / "library")
        library.start()
        started.append(library)
        touch(tmp_path, "staging/batch/one.nii.gz", "staging/batch/two.nii.gz")
        (tmp_path / "staging" / "batch").rename(tmp_path / "library" / "batch")
        wait_until(lambda: len(library) == 2, DEADLINE, "a moved-in folder")
        (tmp_path / "library" / "batch").rename(tmp_path / "batch")
        wait_until(lambda: len(library) == 0, DEADLINE, "a moved-out folder")

    def test_reading_references_wakes_no_watcher(
        self, tmp_path: Path, started: list[ReferenceLibrary], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Only name changes reach the handler: reading a reference (as every conversion
        does) is not an event to handle."""
        seen: list[str] = []
        handle = ChangeHandler.on_any_event

        def record(self: ChangeHandler, event: FileSystemEvent) -> None:
            seen.append(event.event_type)
            handle(self, event)

        monkeypatch.setattr(ChangeHandler, "on_any_event", record)
        library = library_of(tmp_path / "library", "old.nii.gz")
        library.start()
        started.append(library)
        for _ in range(5):
            (tmp_path / "library" / "old.nii.gz").read_bytes()
        touch(tmp_path / "library", "new.nii.gz")
        wait_until(lambda: len(library) == 2, DEADLINE, "the new reference")
        assert set(seen) == {"created"}

    def test_symlinked_folder_is_watched(
        self, tmp_path: Path, started: list[ReferenceLibrary]
    ) -> None:
        """A reference added in a symlinked folder outside the library is seen without a rescan."""
        (tmp_path / "elsewhere").mkdir()
        library_dir = tmp_path / "library"
        library_dir.mkdir()
        (library_dir / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        library = ReferenceLibrary([library_dir])
        library.build()
        library.start(rescan_interval=3600.0)
        started.append(library)
        touch(tmp_path, "elsewhere/new.nii.gz")
        seen_as = library_dir / "link" / "new.nii.gz"
        wait_until(
            lambda: matches(library, "new.npz", seen_as), DEADLINE, "a reference behind a symlink"
        )
        (tmp_path / "elsewhere" / "new.nii.gz").unlink()
        wait_until(lambda: len(library) == 0, DEADLINE, "a reference removed behind a symlink")

    def test_library_folder_given_as_a_symlink(
        self, tmp_path: Path, started: list[ReferenceLibrary]
    ) -> None:
        """A library folder that is itself a symlink is watched through to its contents."""
        (tmp_path / "storage").mkdir()
        configured = tmp_path / "library"
        configured.symlink_to(tmp_path / "storage", target_is_directory=True)
        library = ReferenceLibrary([configured])
        library.start(rescan_interval=3600.0)
        started.append(library)
        touch(tmp_path / "storage", "top.nii.gz")
        seen_as = configured / "top.nii.gz"
        wait_until(
            lambda: matches(library, "top.npz", seen_as), DEADLINE, "a reference in a linked root"
        )

    def test_hidden_and_outside_names_stay_out(
        self, tmp_path: Path, started: list[ReferenceLibrary]
    ) -> None:
        """Live updates skip hidden names, and a reference moved out of the library is gone."""
        library = library_of(tmp_path / "library", "leaving.nii")
        library.start(rescan_interval=3600.0)
        started.append(library)
        touch(tmp_path / "library", ".hidden.nii", ".tmp/inside.nii", "marker.nii")
        wait_until(lambda: len(library) == 2, DEADLINE, "the marker reference")
        (tmp_path / "library" / "leaving.nii").rename(tmp_path / "leaving.nii")
        wait_until(lambda: len(library) == 1, DEADLINE, "a reference moved out")
        assert library.match("marker.npz").rule == "exact"

    def test_unreadable_paths_do_not_stop_updates(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: list[ReferenceLibrary]
    ) -> None:
        """A reference whose stat fails (permission denied) is skipped; updates go on."""
        real_stat = Path.stat

        def stat(path: Path, *, follow_symlinks: bool = True) -> os.stat_result:
            if path.name.startswith("forbidden"):
                raise PermissionError(13, "Permission denied", str(path))
            return real_stat(path, follow_symlinks=follow_symlinks)

        monkeypatch.setattr(Path, "stat", stat)
        library = library_of(tmp_path)
        library.start(rescan_interval=3600.0)
        started.append(library)
        touch(tmp_path, "forbidden.nii")
        (allowed,) = touch(tmp_path, "allowed.nii")
        wait_until(
            lambda: matches(library, "allowed.npz", allowed),
            DEADLINE,
            "a reference after a failure",
        )
        assert matches(library, "forbidden.npz", None)

    def test_rescan_catches_what_events_missed(
        self, tmp_path: Path, started: list[ReferenceLibrary]
    ) -> None:
        """With no events arriving (a poll every hour), the periodic rescan finds a change."""
        library = library_of(tmp_path, observer="polling", poll_interval=3600.0)
        library.start(rescan_interval=0.2)
        started.append(library)
        (late,) = touch(tmp_path, "late.nii.gz")
        wait_until(lambda: matches(library, "late.npz", late), DEADLINE, "the rescan")

    def test_lookups_during_updates(self, tmp_path: Path, started: list[ReferenceLibrary]) -> None:
        """Lookups from several threads while the index changes never fail unexpectedly."""
        library = library_of(tmp_path, "stable.nii.gz")
        library.start(rescan_interval=0.05)
        started.append(library)
        problems: list[BaseException] = []
        done = threading.Event()

        def look_up() -> None:
            while not done.is_set():
                try:
                    assert library.match("stable_x.npz").reference == tmp_path / "stable.nii.gz"
                    library.match("stable.npz")
                except BaseException as problem:  # handed to the test thread, which reports it
                    problems.append(problem)
                    return

        readers = [threading.Thread(target=look_up) for _ in range(3)]
        for reader in readers:
            reader.start()
        for number in range(200):
            touch(tmp_path, f"stable_{number:04d}.nii")
        wait_until(lambda: len(library) == 201, DEADLINE, "every new reference")
        done.set()
        for reader in readers:
            reader.join()
        assert problems == []

    def test_stop_is_idempotent_and_a_context_manager(self, tmp_path: Path) -> None:
        """`with library:` starts and stops it; stopping twice is harmless."""
        library = ReferenceLibrary([tmp_path])
        with library:
            touch(tmp_path, "seen.nii")
            wait_until(lambda: len(library) == 1, DEADLINE, "a reference added inside `with`")
        library.stop()
        library.stop()


class TestStartOrder:
    def test_start_after_build_sees_what_changed_in_between(
        self, tmp_path: Path, started: list[ReferenceLibrary]
    ) -> None:
        """A reference added after `build()` but before `start()` is indexed by the
        time `start()` returns, though no rescan is due for an hour."""
        library = library_of(tmp_path, "early.nii.gz")
        (late,) = touch(tmp_path, "late.nii.gz")
        library.start(rescan_interval=3600.0)
        started.append(library)
        assert matches(library, "late.npz", late)

    def test_changes_while_the_first_walk_runs_are_applied_once(
        self, tmp_path: Path, started: list[ReferenceLibrary], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """References added and removed while `start()` walks the library (after the
        watch is live) end up indexed as they are on disk, each once."""
        touch(tmp_path, "gone.nii.gz", "kept.nii.gz")
        library = ReferenceLibrary([tmp_path])
        real_build = library.build

        def build_while_things_change() -> None:
            touch(tmp_path, "before_walk.nii.gz")  # seen by the walk and by its event
            real_build()
            touch(tmp_path, "after_walk.nii.gz")  # seen by its event only
            (tmp_path / "gone.nii.gz").unlink()

        monkeypatch.setattr(library, "build", build_while_things_change)
        library.start(rescan_interval=3600.0)
        started.append(library)
        wait_until(
            lambda: matches(library, "after_walk.npz", tmp_path / "after_walk.nii.gz"),
            DEADLINE,
            "a reference added after the walk",
        )
        wait_until(lambda: matches(library, "gone.npz", None), DEADLINE, "a reference removed")
        assert len(library) == 3
        assert library.match("before_walk.npz").candidates == (tmp_path / "before_walk.nii.gz",)


class TestLostWatches:
    @pytest.mark.parametrize("observer", ["inotify", "polling"])
    def test_folder_deleted_and_made_again_is_watched_again(
        self, tmp_path: Path, observer: str, started: list[ReferenceLibrary]
    ) -> None:
        """The library folder removed and made again: its new references are seen
        (without a rescan for an hour), first those made with it, then later ones."""
        folder = tmp_path / "library"
        library = library_of(folder, "old.nii.gz", observer=observer, poll_interval=0.1)
        library.start(rescan_interval=3600.0)
        started.append(library)
        shutil.rmtree(folder)
        wait_until(lambda: len(library) == 0, DEADLINE, "the removed folder's references forgotten")
        (first,) = touch(folder, "first.nii.gz")
        wait_until(
            lambda: matches(library, "first.npz", first), DEADLINE, "a reference in the new folder"
        )
        (later,) = touch(folder, "sub/later.nii.gz")
        wait_until(lambda: matches(library, "later.npz", later), DEADLINE, "a later reference")
        assert len(library) == 2

    def test_folder_renamed_away_and_replaced_is_watched_again(
        self, tmp_path: Path, started: list[ReferenceLibrary]
    ) -> None:
        """A library folder renamed away and replaced is found at the next check: the
        new folder is watched and indexed, the old one's files stay out."""
        folder = tmp_path / "library"
        library = library_of(folder, "old.nii.gz")
        library.start(rescan_interval=3600.0)
        started.append(library)
        assert library.renew_watches() == []
        folder.rename(tmp_path / "library.old")
        (replaced,) = touch(folder, "replaced.nii.gz")
        assert library.renew_watches() == [folder]
        assert matches(library, "replaced.npz", replaced)
        assert matches(library, "old.npz", None)
        touch(tmp_path, "library.old/ghost.nii.gz")
        (new,) = touch(folder, "new.nii.gz")
        wait_until(
            lambda: matches(library, "new.npz", new), DEADLINE, "a reference in the new folder"
        )
        assert matches(library, "ghost.npz", None)

    def test_build_sets_lost_watches_again(
        self, tmp_path: Path, started: list[ReferenceLibrary]
    ) -> None:
        """A full build while started (SIGHUP) watches a replaced folder again first."""
        folder = tmp_path / "library"
        library = library_of(folder, "old.nii.gz")
        library.start(rescan_interval=3600.0)
        started.append(library)
        folder.rename(tmp_path / "library.old")
        folder.mkdir()
        library.build()
        assert library.renew_watches() == []
        (new,) = touch(folder, "new.nii.gz")
        wait_until(
            lambda: matches(library, "new.npz", new), DEADLINE, "a reference in the new folder"
        )

    def test_missing_folder_is_watched_once_made(
        self, tmp_path: Path, started: list[ReferenceLibrary]
    ) -> None:
        """A library folder missing at start is watched once it is made."""
        folder = tmp_path / "library"
        library = ReferenceLibrary([folder], poll_interval=0.1)
        library.start(rescan_interval=3600.0)
        started.append(library)
        (made,) = touch(folder, "made.nii.gz")
        wait_until(
            lambda: matches(library, "made.npz", made), DEADLINE, "a reference in the made folder"
        )
        (later,) = touch(folder, "later.nii.gz")
        wait_until(lambda: matches(library, "later.npz", later), DEADLINE, "a later reference")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
class TestSymlinkLoops:
    def test_two_links_to_one_folder_are_not_duplicates(self, tmp_path: Path) -> None:
        """A folder reached through two links is indexed once, so its keys stay unique."""
        touch(tmp_path, "real/only.nii.gz")
        library_dir = tmp_path / "library"
        library_dir.mkdir()
        (library_dir / "one").symlink_to(tmp_path / "real", target_is_directory=True)
        (library_dir / "two").symlink_to(tmp_path / "real", target_is_directory=True)
        library = ReferenceLibrary([library_dir])
        library.build()
        assert len(library) == 1
        assert library.match("only.npz").rule == "exact"


def profile_library(root: Path, *profiles: dict[str, object]) -> ReferenceLibrary:
    """The library of settings rooted at `root` with these `profiles`."""
    settings = load_settings(root=root, profiles=list(profiles))
    return ReferenceLibrary.from_settings(settings)


NNUNET_PROFILE = {"name": "nnunet", "match": "nnunet/**", "library": ["nnunet_refs"]}
PATTERN_PROFILE = {"name": "runs", "match": "runs/**", "key_pattern": "^(?P<key>case\\d+)"}


class TestProfiles:
    def test_a_profile_library_restricts_matching(self, tmp_path: Path) -> None:
        """A name whose reference exists in both folders resolves, per profile, to the
        one in that profile's folders; the top level never sees the profile's."""
        top = touch(tmp_path / "library", "case1.nii.gz", "only_top.nii.gz")
        own = touch(tmp_path / "nnunet_refs", "case1_0000.nii.gz")
        library = profile_library(tmp_path, NNUNET_PROFILE)
        library.build()
        assert library.match("case1.npz").reference == top[0]
        assert library.match("case1.npz", "nnunet").reference == own[0]
        assert library.match("case1.npz", "nnunet").rule == "input_prefix"
        with pytest.raises(ConversionError) as raised:
            library.match("only_top.npz", "nnunet")
        assert raised.value.code is ErrorCode.NO_REFERENCE
        assert str(tmp_path / "nnunet_refs") in raised.value.message
        assert len(library) == 3

    def test_a_profile_key_pattern_keys_the_references_its_way(self, tmp_path: Path) -> None:
        """With its own key_pattern a profile finds `case002_ct` for `case002_r00`,
        while the top level matches by its rules in the same folder."""
        ct, scan = touch(tmp_path / "library", "case002_ct.nii.gz", "case002_r00.nii.gz")
        library = profile_library(tmp_path, PATTERN_PROFILE)
        library.build()
        assert library.match("case002_r00.npz").reference == scan
        with pytest.raises(ConversionError) as raised:  # two scans keyed case002 there
            library.match("case002_r00.npz", "runs")
        assert raised.value.code is ErrorCode.AMBIGUOUS_REFERENCE
        scan.unlink()
        library.rescan()
        found = library.resolve("case002_r01.npz", "runs")
        assert (found.reference, found.rule, found.key) == (ct, "key_pattern", "case002")
        assert library.key_for("case002_r01.npz", "runs") == "case002"

    def test_a_profile_missing_reference_applies_to_its_inputs(self, tmp_path: Path) -> None:
        """`missing_reference = identity` in a profile gives its inputs an identity
        match; the top level still fails."""
        (tmp_path / "library").mkdir()
        library = profile_library(
            tmp_path, {"name": "id", "match": "**", "missing_reference": "identity"}
        )
        library.build()
        assert library.resolve("x.npz", "id").rule == "identity"
        with pytest.raises(ConversionError):
            library.resolve("x.npz")

    def test_every_folder_is_walked_once(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """However many profiles name a folder, a build walks each folder once."""
        touch(tmp_path / "library", "a.nii")
        touch(tmp_path / "nnunet_refs", "b.nii")
        walked: list[str] = []
        scan = ReferenceScanner.scan

        def counted(self: ReferenceScanner, folder: str) -> list[tuple[str, str]]:
            walked.append(folder)
            return scan(self, folder)

        monkeypatch.setattr(ReferenceScanner, "scan", counted)
        second = {**NNUNET_PROFILE, "name": "again", "match": "again/**"}
        library = profile_library(tmp_path, NNUNET_PROFILE, second, PATTERN_PROFILE)
        library.build()
        assert sorted(walked) == [str(tmp_path / "library"), str(tmp_path / "nnunet_refs")]
        assert len(library) == 2

    def test_live_updates_reach_each_profile(
        self, tmp_path: Path, started: list[ReferenceLibrary]
    ) -> None:
        """While started, a reference added to or removed from a profile's folder is
        seen by that profile's matching, through the library's one watch."""
        (tmp_path / "library").mkdir()
        (tmp_path / "nnunet_refs").mkdir()
        library = profile_library(tmp_path, NNUNET_PROFILE)
        started.append(library)
        library.start()
        (added,) = touch(tmp_path / "nnunet_refs", "case7_0000.nii.gz")

        def profile_sees(expected: Path | None) -> bool:
            try:
                return library.match("case7.npz", "nnunet").reference == expected
            except ConversionError:
                return expected is None

        wait_until(lambda: profile_sees(added), DEADLINE, "the added reference")
        assert not matches(library, "case7.npz", added)  # not the top level's folder
        added.unlink()
        wait_until(lambda: profile_sees(None), DEADLINE, "the removed reference")
