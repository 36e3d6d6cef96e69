"""Dates as git 2.39 reads and writes them, git the oracle: GIT_AUTHOR_DATE and
GIT_COMMITTER_DATE (git var and commit-tree against mintvcs's signature and commit)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.mintvcs.storekit import ENV

# mintvcs's reading of each GIT_AUTHOR_DATE on stdin (a JSON list), in one process: the
# timestamp and zone the author line would get, or the error line.
_SIGNATURES = """
import json, os, sys
from mintvcs.errors import MintError
from mintvcs.porcelain import signature
out = []
for date in json.load(sys.stdin):
    os.environ["GIT_AUTHOR_DATE"] = date
    try:
        sig = signature(None, "author")
    except MintError as err:
        out.append("refused: " + str(err))
    else:
        out.append(f"{sig.timestamp} {sig.tz}")
print(json.dumps(out))
"""


def _env(tz: str) -> dict[str, str]:
    return {**ENV, "TZ": tz, "GIT_AUTHOR_NAME": "A U", "GIT_AUTHOR_EMAIL": "a@example.com"}


def git_dates(tz: str, dates: list[str]) -> list[str]:
    """What git writes in an author line for each date under `tz` ("refused" if it dies)."""
    found = []
    for date in dates:
        result = subprocess.run(
            ["git", "var", "GIT_AUTHOR_IDENT"],
            env={**_env(tz), "GIT_AUTHOR_DATE": date},
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode:
            assert "invalid date format" in result.stderr, result.stderr
            found.append("refused")
        else:
            found.append(result.stdout.strip().rpartition("> ")[2])
    return found


def mint_dates(tz: str, dates: list[str]) -> list[str]:
    """What mintvcs writes for each date under `tz`, in one process ("refused: why" if refused)."""
    result = subprocess.run(
        [sys.executable, "-c", _SIGNATURES],
        env=_env(tz),
        input=json.dumps(dates),
        capture_output=True,
        text=True,
        check=True,
    )
    return list(json.loads(result.stdout))


def assert_read_as_git(tz: str, dates: list[str]) -> None:
    theirs = git_dates(tz, dates)
    ours = mint_dates(tz, dates)
    for date, git_wrote, we_wrote in zip(dates, theirs, ours, strict=True):
        if git_wrote == "refused":
            assert we_wrote.startswith("refused: "), (tz, date, we_wrote)
        else:
            assert we_wrote == git_wrote, (tz, date)


@pytest.mark.parametrize("tz", ["<XYZ>+3:30:30", "<XYZ>+0:00:30", "<XYZ>-5:45:59"])
def test_now_in_a_zone_with_seconds_is_written_as_git_writes_it(tz: str) -> None:
    # No date given: now, in the local zone, whose offset's seconds git drops toward zero.
    theirs, ours = git_dates(tz, [""]), mint_dates(tz, [""])
    (git_seconds, git_zone), (seconds, zone) = theirs[0].split(), ours[0].split()
    assert zone == git_zone and abs(int(seconds) - int(git_seconds)) < 60, (theirs, ours)


# RFC 2822 zones and AM/PM, and bare numbers (dates review, 1, 2 and 6), each against git.
RFC_AND_NUMBERS = [
    "Tue, 14 Nov 2023 22:13:20 -0000",
    "Tue, 14 Nov 2023 22:13:20 +01:00",
    "14 Nov 2023 10:13:20 PM +0100",
    "14 Nov 2023 12:13:20 AM +0100",
    "14 Nov 2023 10:13:20 PM",
    "Tue, 14 Nov 2023 22:13:20 +0100 (CET)",
    "Tue, 14 Nov 2023 22:13:20 GMT",
    "Tue, 14 Nov 2023 22:13:20 CDT",
    "Tue, 14 Nov 2023 22:13:20",
    "20231114",
    "@99999999",
    "12345 +0100",
    "0",
    "@0 +0000",
    "1700000000 -0000",
    "@1700000000",
]


@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Asia/Kathmandu"])
def test_rfc2822_zones_and_bare_numbers_are_read_as_git_reads_them(tz: str) -> None:
    assert_read_as_git(tz, RFC_AND_NUMBERS)


def test_a_date_it_cannot_read_is_refused_naming_the_forms_it_takes() -> None:
    # git ignores an impossible zone or an unknown word and takes local time; mintvcs refuses.
    dates = ["Tue, 14 Nov 2023 22:13:20 +0199", "14 Nov 2023 22:13:20 XYZ"]
    for we_wrote in mint_dates("UTC", dates):
        assert we_wrote.startswith("refused: ") and "RFC 2822 with a time of day" in we_wrote
