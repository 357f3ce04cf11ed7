"""The test harness itself: tests that use the host's real cgroups hold one lock, so that two never overlap."""
import fcntl

import pytest

from conftest import REAL_CGROUPS_LOCK


def lock_is_free() -> bool:
    with open(REAL_CGROUPS_LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


@pytest.mark.host_cgroups
def test_a_host_cgroups_test_holds_the_lock():
    assert not lock_is_free()          # another open file cannot take it while this test runs

