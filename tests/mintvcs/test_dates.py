"""Dates as git 2.39 reads and writes them, git the oracle: GIT_AUTHOR_DATE and
GIT_COMMITTER_DATE (git var and commit-tree against mintvcs's signature and commit)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mintvcs.dates import zone_seconds
from tests.mintvcs.storekit import ENV, git, loose_path, mint

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
    "Tue Nov 14 22:13:20 CET 2023",  # what `date` prints
    "Tue, 14 Nov 2023 22:13:20 CEST",
    "Tue, 14 Nov 2023 22:13:20 JST",
    "Tue, 14 Nov 2023 22:13:20 NZDT",
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


def literal_commit(git_dir: Path, parent: str, author: str, committer: str, message: str) -> str:
    """A commit written byte for byte as given (git hash-object --literally: git's own checks
    would refuse a malformed date line)."""
    tree = git(git_dir, "rev-parse", f"{parent}^{{tree}}").stdout.strip()
    body = (
        f"tree {tree}\nparent {parent}\nauthor A U <a@x> {author}\n"
        f"committer C U <c@x> {committer}\n\n{message}\n"
    )
    return git(
        git_dir, "hash-object", "-t", "commit", "-w", "--literally", "--stdin", input_text=body
    ).stdout.strip()


def test_a_malformed_date_line_is_read_as_git_reads_it(work: Path) -> None:
    # Old or buggy tools wrote such lines: git log, show and checkout read the commits (a date
    # they cannot read is the epoch), only fsck flags them. mintvcs took each for a corrupt
    # object, and every command reading a history through one failed.
    git_dir = work / ".mint"
    tip = git(git_dir, "rev-parse", "main").stdout.strip()
    for n, (author, committer) in enumerate(
        [
            ("1700000000", "1700000000 +0000"),  # no zone: the epoch
            ("1700000000 +0000 extra", "1700000000 +0000"),  # what follows is ignored
            ("1700000000 +1a00", "1700000000 +0000"),  # the zone's digits, as far as they go
            ("1700000000 ", "1700000000 "),  # an empty zone (dulwich failed another way): the epoch
            ("1700000000 +0000", "garbage"),
            ("1700000000", "1700000100"),
        ]
    ):
        tip = literal_commit(git_dir, tip, author, committer, f"odd {n}")
    tip = literal_commit(git_dir, tip, "1700000200 +0100", "1700000200 +0100", "good")
    git(git_dir, "update-ref", "refs/heads/odd", tip)
    odd_one = git(git_dir, "rev-parse", "odd~1").stdout.strip()

    def dates_git_shows() -> list[tuple[int, int, int]]:
        # %ad is empty where git finds no date (its Date: line then shows the epoch).
        rows = git(git_dir, "log", "--format=%ad|%cd", "--date=raw", "odd").stdout.splitlines()
        found = []
        for row in rows:
            (author, zone), (committer, _zone) = (
                (part or "0 +0000").split() for part in row.split("|")
            )
            found.append((int(author), zone_seconds(int(zone)), int(committer)))
        return found

    def dates_mint_shows() -> list[tuple[int, int, int]]:
        listed = json.loads(mint(work, "log", "--json", "odd").stdout)
        return [(c["author_time"], c["author_timezone"], c["time"]) for c in listed]

    assert dates_mint_shows() == dates_git_shows()
    assert dates_git_shows()[1] == (0, 0, 0)  # neither line has a zone
    date_lines = [line for line in mint(work, "log", "odd").stdout.splitlines() if "Date:" in line]
    assert date_lines == [
        line for line in git(git_dir, "log", "odd").stdout.splitlines() if "Date:" in line
    ]
    assert "Date:   Thu Jan 1 00:00:00 1970 +0000" in mint(work, "show", "odd~1").stdout
    mint(work, "diff", "main", "odd")
    mint(work, "checkout", "odd")
    mint(work, "checkout", "main")
    # gc keeps the history, packed: read from the pack, the commits read the same.
    mint(work, "gc")
    assert not loose_path(work, tip).exists() and not loose_path(work, odd_one).exists()
    assert dates_mint_shows() == dates_git_shows()
    # fsck still flags each, as git fsck does.
    assert git(git_dir, "fsck", ok=False).returncode != 0
    fsck = mint(work, "fsck", ok=False)
    assert fsck.returncode != 0
    assert fsck.stderr.count("malformed commit") == 6, fsck.stderr


def test_the_date_of_an_odd_identity_is_read_as_git_reads_it(work: Path) -> None:
    # git reads a date only after an identity's `<...>`, from its last `>` on: digits alone,
    # or after a `>` with no `<`, are no date (the epoch), though they look like one.
    git_dir = work / ".mint"
    tip = git(git_dir, "rev-parse", "main").stdout.strip()
    tree = git(git_dir, "rev-parse", "main^{tree}").stdout.strip()
    authors = [
        "1700000000 +0100",
        "A> 1700000000 +0100",
        "A <a@x>> 1700000000 -0130",
        "A <a@x> 1700000000 +2147483647",  # git keeps a zone short of int's bounds: +0000
        "A <a@x> \v1700000000 +0100",  # git log skips no \v before the date
    ]
    for n, author in enumerate(authors):
        body = (
            f"tree {tree}\nparent {tip}\nauthor {author}\n"
            f"committer C U <c@x> 1700000100 +0000\n\nodd {n}\n"
        )
        command = ("hash-object", "-t", "commit", "-w", "--literally", "--stdin")
        tip = git(git_dir, *command, input_text=body).stdout.strip()
    git(git_dir, "update-ref", "refs/heads/odd", tip)
    rows = git(git_dir, "log", "-5", "--format=%ad", "--date=raw", "odd").stdout.splitlines()
    # No date: %ad is empty (and git's Date: line shows the epoch).
    shown = [(int(t), zone_seconds(int(z))) for t, z in (r.split() or ("0", "0") for r in rows)]
    assert shown == [(0, 0), (1700000000, 0), (1700000000, -5400), (0, 0), (0, 0)]
    listed = json.loads(mint(work, "log", "--json", "-n", "5", "odd").stdout)
    assert [(c["author_time"], c["author_timezone"]) for c in listed] == shown


def test_dates_are_shown_as_git_shows_them(work: Path) -> None:
    # Zones git itself writes from `@N +0060` or that other tools wrote: git log prints their
    # digits as they are, at the wall clock they give; a date git does not read as digits
    # (a sign, an underscore) is the epoch, where Python's int() read it.
    git_dir = work / ".mint"
    tip = git(git_dir, "rev-parse", "main").stdout.strip()
    for n, author in enumerate(
        [
            "1700000000 +0060",
            "1700000000 +9999",
            "1700000000 -2400",
            "1700000000 -0000",
            "1700000000 -0130",
            "-1 +0000",
            "1_700_000_000 +0000",
            "01700000000 +0100",
            "1700000000  +0100",
        ]
    ):
        tip = literal_commit(git_dir, tip, author, "1700000000 +0000", f"zone {n}")
    git(git_dir, "update-ref", "refs/heads/zones", tip)
    ours = [line for line in mint(work, "log", "zones").stdout.splitlines() if "Date:" in line]
    theirs = [line for line in git(git_dir, "log", "zones").stdout.splitlines() if "Date:" in line]
    assert ours == theirs
    assert ours[6:9] == [  # newest first
        "Date:   Mon Nov 13 22:13:20 2023 -2400",
        "Date:   Sun Nov 19 02:52:20 2023 +9999",
        "Date:   Tue Nov 14 23:13:20 2023 +0060",
    ]
    raw = git(git_dir, "log", "--format=%ad", "--date=raw", "zones").stdout.splitlines()
    listed = json.loads(mint(work, "log", "--json", "zones").stdout)
    assert [(c["author_time"], c["author_timezone"]) for c in listed] == [
        (int(seconds), zone_seconds(int(zone)))
        for seconds, zone in ((row or "0 +0000").split() for row in raw)
    ]


@pytest.mark.parametrize(
    "odd",
    [
        *("-1 +0000", "1_900 +0000", "1900", " +5 +0000", "99999999999999999999999 +0000", "x"),
        "\v3000 +0000",  # strtoumax skips \v: the newest
    ],
)
def test_log_orders_commits_by_the_date_git_reads(work: Path, odd: str) -> None:
    # git orders by strtoumax of the committer line after its '>': -1 is 2^64 - 1, the newest
    # (mintvcs sorted it as the oldest), 1_900 is 1, a date without a zone counts, a sign and
    # blanks are taken, an overflow is 2^64 - 1, no digits is 0.
    git_dir = work / ".mint"
    root = git(git_dir, "rev-parse", "main").stdout.strip()
    first = literal_commit(git_dir, root, "1000 +0000", "1000 +0000", "A")
    odd_one = literal_commit(git_dir, first, "1000 +0000", odd, "B")
    later = literal_commit(git_dir, odd_one, "2000 +0000", "2000 +0000", "C")
    side = literal_commit(git_dir, first, "1500 +0000", "1500 +0000", "D")
    git(git_dir, "update-ref", "refs/heads/later", later)
    git(git_dir, "update-ref", "refs/heads/side", side)
    for spec in (["later", "side"], ["side..later"], ["later...side"], ["later", "^main"]):
        listed = [c["commit"] for c in json.loads(mint(work, "log", "--json", *spec).stdout)]
        assert listed == git(git_dir, "log", "--format=%H", *spec).stdout.split(), spec


def test_a_commit_ending_at_its_committer_line_is_ordered_as_git_orders_it(work: Path) -> None:
    # git reads the ordering date only where something follows the committer line: a commit
    # that ends there (no blank line, no message) sorts as the epoch, whatever its date.
    git_dir = work / ".mint"
    root = git(git_dir, "rev-parse", "main").stdout.strip()
    tree = git(git_dir, "rev-parse", "main^{tree}").stdout.strip()
    first = literal_commit(git_dir, root, "1000 +0000", "1000 +0000", "A")
    body = f"tree {tree}\nparent {first}\nauthor A <a@x> 3000 +0000\ncommitter C <c@x> 3000 +0000\n"
    command = ("hash-object", "-t", "commit", "-w", "--literally", "--stdin")
    bare = git(git_dir, *command, input_text=body).stdout.strip()
    side = literal_commit(git_dir, first, "2000 +0000", "2000 +0000", "D")
    listed = [c["commit"] for c in json.loads(mint(work, "log", "--json", bare, side).stdout)]
    assert listed == git(git_dir, "log", "--format=%H", bare, side).stdout.split()
    assert listed[0] == side and listed[-1] == bare  # dated 3000, and yet the oldest


def test_fsck_flags_the_date_lines_git_fsck_flags(work: Path) -> None:
    # dulwich only checks that a date fits 64 bits: mintvcs fsck passed what git fsck rejects,
    # which a server with receive.fsckObjects would refuse. Each line below, as an author's,
    # a committer's or a tagger's, gets git fsck's message id, or passes as in git.
    git_dir = work / ".mint"
    main = git(git_dir, "rev-parse", "main").stdout.strip()
    dates = [
        "01700000000 +0000",  # zeroPaddedDate
        "1_700_000_000 +0000",  # badDate
        "-1 +0000",  # badDateOverflow
        "9223372036854775808 +0000",
        "18446744073709551621 +0000",
        "- +0000",  # badDate: a sign, no digits
        " x",
        "1700000000 +01",  # badTimezone
        "1700000000 +000000",
        "1700000000 ",
        "1700000000 +0000 extra",
        "1700000000",
        "1700000000  +0000",
        " 1700000000 +0000",
        "0 +0000",  # all right
        "9223372036854775807 +0000",
        "1700000000 -9999",
    ]
    made = {}
    for n, date in enumerate(dates):
        made[literal_commit(git_dir, main, date, "1700000000 +0000", f"a{n}")] = date
        made[literal_commit(git_dir, main, "1700000000 +0000", date, f"c{n}")] = date
        tag = f"object {main}\ntype commit\ntag t{n}\ntagger T <t@x> {date}\n\nm\n"
        made[
            git(
                git_dir, "hash-object", "-t", "tag", "-w", "--literally", "--stdin",
                input_text=tag,
            ).stdout.strip()
        ] = date  # fmt: skip
    # Identities that are odd before the date (no name: git says so, not that a space is missing).
    for n, ident in enumerate(
        ["<t@x> 1700000000 +0000", "T <t@x>1700000000 +0000", "T<t@x> 1 +0000"]
    ):
        tag = f"object {main}\ntype commit\ntag i{n}\ntagger {ident}\n\nm\n"
        command = ("hash-object", "-t", "tag", "-w", "--literally", "--stdin")
        made[git(git_dir, *command, input_text=tag).stdout.strip()] = ident

    def flagged(output: str, prefix: str) -> dict[str, str]:
        found = {}
        for line in output.splitlines():
            if line.startswith(prefix):
                oid, _, rest = line.removeprefix(prefix).partition(": ")
                found[oid.split()[-1]] = rest.partition(":")[0]
        return {oid: found.get(oid, "ok") for oid in made}

    theirs = flagged(git(git_dir, "fsck", "--no-dangling", ok=False).stderr, "error in ")
    ours = flagged(mint(work, "fsck", ok=False).stderr, "error: malformed ")
    assert ours == theirs
    assert {made[oid]: why for oid, why in theirs.items()} == {
        "01700000000 +0000": "zeroPaddedDate",
        "1_700_000_000 +0000": "badDate",
        "-1 +0000": "badDateOverflow",
        "9223372036854775808 +0000": "badDateOverflow",
        "18446744073709551621 +0000": "badDateOverflow",
        "- +0000": "badDate",
        " x": "badDate",
        "<t@x> 1700000000 +0000": "missingNameBeforeEmail",
        "T <t@x>1700000000 +0000": "missingSpaceBeforeDate",
        "T<t@x> 1 +0000": "missingSpaceBeforeEmail",
        "1700000000 +01": "badTimezone",
        "1700000000 +000000": "badTimezone",
        "1700000000 ": "badTimezone",
        "1700000000 +0000 extra": "badTimezone",
        "1700000000": "badDate",
        "1700000000  +0000": "badTimezone",
        " 1700000000 +0000": "ok",
        "0 +0000": "ok",
        "9223372036854775807 +0000": "ok",
        "1700000000 -9999": "ok",
    }


def test_a_tag_with_a_malformed_tagger_date_is_read_as_git_reads_it(work: Path) -> None:
    # As a commit's: git log, show and checkout go through such a tag, loose or packed.
    git_dir = work / ".mint"
    main = git(git_dir, "rev-parse", "main").stdout.strip()
    odd = {"nozone": "1700000000", "emptyzone": "1700000000 ", "extra": "1700000000 +0000 extra"}
    for name, date in odd.items():
        body = f"object {main}\ntype commit\ntag {name}\ntagger T <t@x> {date}\n\nm\n"
        tag = git(
            git_dir, "hash-object", "-t", "tag", "-w", "--literally", "--stdin", input_text=body
        ).stdout.strip()
        git(git_dir, "update-ref", f"refs/tags/{name}", tag)
    for packed in (False, True):
        if packed:
            mint(work, "gc")
            assert not loose_path(work, tag).exists()
        for name in odd:
            listed = json.loads(mint(work, "log", "--json", name).stdout)
            assert [c["commit"] for c in listed] == git(
                git_dir, "log", "--format=%H", name
            ).stdout.split()
            assert mint(work, "show", "--json", name).returncode == 0
            mint(work, "checkout", name)
            assert git(git_dir, "rev-parse", "HEAD").stdout.strip() == main
            mint(work, "checkout", "main")
    assert "badDate" in mint(work, "fsck", ok=False).stderr


@pytest.mark.parametrize(
    ("tz", "days"),
    [
        ("Europe/Berlin", ("2023-03-26", "2023-10-29")),
        ("America/New_York", ("2023-03-12", "2023-11-05")),
        ("Australia/Lord_Howe", ("2023-04-02", "2023-10-01")),  # a half-hour change
        ("Europe/Dublin", ("2024-03-31", "2024-10-27")),  # winter is its "daylight" time
    ],
)
def test_local_times_around_a_summer_time_change_are_dated_as_gits(
    tz: str, days: tuple[str, str]
) -> None:
    # Wall clocks in the spring gap, in the autumn hour that comes twice and around them: git
    # writes the wall clock's distance from the instant it picks as the zone (Berlin's 02:30
    # in the gap is +0100 where the zone in force at that instant is +0200).
    dates = [f"{day} {h:02d}:{m:02d}:00" for day in days for h in range(5) for m in (0, 30)]
    assert_read_as_git(tz, [*dates, "Sun, 29 Oct 2023 02:30:00", "2023-07-01T12:00:00"])


def test_a_date_without_a_time_of_day_is_refused_as_git_refuses_it() -> None:
    dates = ["2023-11-14", "20231114"]
    assert git_dates("UTC", dates) == ["refused", "refused"]
    for we_wrote in mint_dates("UTC", dates):
        assert we_wrote.startswith("refused: ") and "invalid date format" in we_wrote


def test_numbers_too_long_for_int_are_refused_without_a_traceback() -> None:
    # Python's int() stops at 4300 digits; such a date is past any mintvcs writes anyway.
    long = "9" * 5000
    dates = [long, f"@{long}", f"{long} +0100", f"Tue, 14 Nov 2023 22:13:{long} +0100"]
    for we_wrote in mint_dates("UTC", dates):
        assert we_wrote.startswith("refused: "), we_wrote
