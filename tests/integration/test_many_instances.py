"""Many instances on one local spool, killed and paused at random (README: Many
instances, one spool): every input exactly once, nothing lost, nothing left."""

from __future__ import annotations

from pathlib import Path

from chaos import Chaos


class TestChaos:
    def test_three_instances_killed_restarted_and_one_paused(self, tmp_path: Path) -> None:
        """1,000 inputs (one in 17 bad) in bursts, three instances, 12 kills of whole
        process groups (a third of them left dead past their lease) and a zombie:
        each input once in archive or failed, outputs exact, claims adopted and lost,
        and each input's hook run at least once (events adopted with the claims)."""
        chaos = Chaos([tmp_path / "spool"] * 3, tmp_path / "logs", hooked=True)
        report = chaos.run(1000, bursts=20, kills=12)
        assert chaos.audit() == [], report
        assert report.kills == 12
        assert report.zombies == 1
        assert report.events["claim_adopted"] >= 1, report.events
        assert report.events["claim_lost"] >= 1, report.events
        assert report.events["lease_lapsed"] >= 1, report.events
