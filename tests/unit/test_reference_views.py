"""The library as each profile sees it (README: Reference matching, Profiles): which
views share an index, and derived indexes kept in step with the library's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from niftidrop.reference_index import ReferenceIndex
from niftidrop.reference_views import plan_views
from niftidrop.settings import Settings


def settings_of(tmp_path: Path, *profiles: dict[str, Any], **values: Any) -> Settings:
    return Settings.from_values(root=tmp_path, profiles=list(profiles), **values)


def keys(index: ReferenceIndex) -> dict[str, tuple[str, ...]]:
    return dict(index.paths_by_key)


class TestPlan:
    def test_without_profiles_one_view_reads_the_library_index(self, tmp_path: Path) -> None:
        """No profile: one view, keyed by the library's own pattern, not derived."""
        plan = plan_views(settings_of(tmp_path, key_pattern="(?P<key>case\\d+)"))
        assert plan.by_profile == {}
        assert plan.pattern == "(?P<key>case\\d+)"
        (keyed,) = plan.indexes
        assert not keyed.derived
        own = ReferenceIndex([("case1", "/x/case1_ct.nii.gz")])
        plan.rebuild(own)
        assert plan.view(None).keyed.index is own

    def test_profiles_with_the_top_level_folders_and_pattern_share_its_index(
        self, tmp_path: Path
    ) -> None:
        """Profiles that change only conversion settings or separators read the
        library's own index: nothing is derived, nothing is kept twice."""
        plan = plan_views(
            settings_of(
                tmp_path,
                {"name": "a", "match": "a/**", "axis_order": "zyx"},
                {"name": "b", "match": "b/**", "separators": "_"},
            )
        )
        assert [keyed.derived for keyed in plan.indexes] == [False]
        assert plan.view("b").rules.separators == "_"
        assert plan.view("a").keyed is plan.view(None).keyed

    def test_a_profile_library_or_pattern_gets_an_index_of_its_own(self, tmp_path: Path) -> None:
        """A profile with its own folders, or its own key_pattern, reads an index
        derived from the library's (keyed by stems); profiles with the same folders
        and pattern share one; every folder is in the library's roots once."""
        plan = plan_views(
            settings_of(
                tmp_path,
                {"name": "a", "match": "a/**", "library": ["refs"]},
                {"name": "a2", "match": "a2/**", "library": ["refs"], "separators": "-"},
                {"name": "k", "match": "k/**", "key_pattern": "^(?P<key>case\\d+)"},
            )
        )
        assert plan.pattern is None  # the library's own index: stems
        assert plan.roots == (str(tmp_path / "library"), str(tmp_path / "refs"))
        assert all(keyed.derived for keyed in plan.indexes)
        assert len(plan.indexes) == 3  # top level, refs, the pattern's
        assert plan.view("a").keyed is plan.view("a2").keyed
        assert plan.view("a").rules.folders == (str(tmp_path / "refs"),)


class TestDerived:
    def test_rebuild_and_changes_reach_each_view(self, tmp_path: Path) -> None:
        """Each derived index holds only its folders' references, keyed by its
        pattern; an addition and a removal in the library's index reach them."""
        library, refs = str(tmp_path / "library"), str(tmp_path / "refs")
        plan = plan_views(
            settings_of(
                tmp_path,
                {"name": "r", "match": "r/**", "library": ["refs"]},
                {"name": "k", "match": "k/**", "key_pattern": "^(?P<key>case\\d+)_ct$"},
            )
        )
        own = ReferenceIndex(
            [
                ("case1_ct", f"{library}/case1_ct.nii.gz"),
                ("case1_gt", f"{library}/case1_gt.nii.gz"),
                ("case1", f"{refs}/sub/case1.nii.gz"),
            ]
        )
        plan.rebuild(own)
        assert set(keys(plan.view(None).keyed.index)) == {"case1_ct", "case1_gt"}
        assert keys(plan.view("r").keyed.index) == {"case1": (f"{refs}/sub/case1.nii.gz",)}
        assert keys(plan.view("k").keyed.index) == {"case1": (f"{library}/case1_ct.nii.gz",)}
        added, removed = (
            ("case2_ct", f"{library}/case2_ct.nii.gz"),
            ("case1", f"{refs}/sub/case1.nii.gz"),
        )
        own.add(*added)
        own.discard(*removed)
        plan.apply([removed], [added])
        assert set(keys(plan.view("k").keyed.index)) == {"case1", "case2"}
        assert "case2_ct" in plan.view(None).keyed.index
        assert plan.view("r").keyed.index.size == 0

    def test_a_folder_named_like_a_root_is_not_inside_it(self, tmp_path: Path) -> None:
        """`refs2/x.nii` is not in the folder `refs`: roots end at a separator."""
        refs = str(tmp_path / "refs")
        plan = plan_views(settings_of(tmp_path, {"name": "r", "match": "**", "library": ["refs"]}))
        plan.rebuild(ReferenceIndex([("x", f"{refs}2/x.nii"), ("y", f"{refs}/y.nii")]))
        assert list(keys(plan.view("r").keyed.index)) == ["y"]
