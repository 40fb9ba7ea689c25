"""Tests of niftidrop.errors: the configuration error's message."""

from __future__ import annotations

import pickle

from niftidrop.errors import ConfigError


class TestConfigError:
    def test_one_problem_is_the_message(self) -> None:
        """A single problem is the whole message, as before."""
        error = ConfigError('flag --workers: expected a whole number, at least 1, found "x"')
        assert str(error) == 'flag --workers: expected a whole number, at least 1, found "x"'
        assert error.problems == (str(error),)
        assert isinstance(error, ValueError)

    def test_several_problems_one_line_each(self) -> None:
        """Several problems: a count, then each on its own indented line."""
        error = ConfigError("first", "second")
        assert str(error) == "2 problems in the configuration:\n  first\n  second"

    def test_pickles_with_its_problems(self) -> None:
        """A ConfigError crossing a process boundary keeps every problem."""
        copy = pickle.loads(pickle.dumps(ConfigError("first", "second")))
        assert copy.problems == ("first", "second")
        assert str(copy) == str(ConfigError("first", "second"))
