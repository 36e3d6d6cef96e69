"""`log`'s revision walk, as git's: several starting commits, ranges (`A..B`, `^A`, `A...B`),
newest commit first, along first parents (`git log --first-parent`)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mintvcs.store import UnknownRevisionError

if TYPE_CHECKING:
    from mintvcs.store import CommitInfo, Repository

# How many more commits a walk with excluded commits reads once only excluded ones are queued
# and they are older than the last commit it listed: git's SLOP, room for a skewed clock.
SLOP = 5


@dataclass(frozen=True)
class Tip:
    """A commit a log starts from, and whether it is excluded (`^A`, the A of `A..B`)."""

    commit: str
    excluded: bool


def split_range(arg: str) -> tuple[str, str, str] | None:
    """(A, '..' or '...', B) of a range argument, an empty side read as HEAD (as git reads
    `..B`); None for an argument that is no range."""
    left, dots, right = arg.partition("..")
    if not dots:
        return None
    if right.startswith("."):
        dots, right = "...", right[1:]
    if not left and not right and dots == "..":
        raise UnknownRevisionError("invalid revision '..': a range names a revision on one side")
    return left or "HEAD", dots, right or "HEAD"


def named_specs(arg: str) -> list[str]:
    """The revision specs `arg` names: both sides of a range, the revision of `^A`."""
    sides = split_range(arg)
    if sides is not None:
        return [sides[0], sides[2]]
    return [arg.removeprefix("^")]


def tips_of(repo: Repository, args: Sequence[str]) -> list[Tip]:
    """The commits `log ARGS` starts from, in git's order (it breaks ties of commit time):
    `A..B` is ^A B, and `A...B` excludes the merge bases of A and B before listing A and B."""
    tips: list[Tip] = []
    for arg in args:
        if not isinstance(arg, str):
            raise TypeError(f"a revision is named by a str, not {type(arg).__name__}: {arg!r:.60}")
        sides = split_range(arg)
        if sides is None:
            excluded = arg.startswith("^")
            tips.append(Tip(repo.resolve(arg[1:] if excluded else arg), excluded))
            continue
        left, dots, right = sides
        a, b = repo.resolve(left), repo.resolve(right)
        if dots == "...":
            tips += [Tip(base, True) for base in merge_bases(repo, a, b)]
            tips += [Tip(a, False), Tip(b, False)]
        else:
            tips += [Tip(a, True), Tip(b, False)]
    return tips


def merge_bases(repo: Repository, a: str, b: str) -> list[str]:
    """The common ancestors of `a` and `b`, through every parent, that no other common ancestor
    walked reaches, as git paints them (newest first; stops once every queued commit is common)."""
    if a == b:
        return [a]
    one, two, stale = 1, 2, 4
    flags = {a: one, b: two}
    parents: dict[str, tuple[str, ...]] = {}
    queue: list[tuple[int, int, str]] = []
    order = itertools.count()

    def push(oid: str) -> None:
        info = repo.commit_info(oid)
        parents[oid] = info.parents
        heapq.heappush(queue, (-info.time, next(order), oid))

    push(a)
    push(b)
    found: dict[str, None] = {}
    while any(not flags[oid] & stale for *_key, oid in queue):
        *_key, oid = heapq.heappop(queue)
        mark = flags[oid]
        if mark == one | two:
            found[oid] = None
            mark |= stale  # what a common ancestor reaches is no better a base
        for parent in parents[oid]:
            if flags.get(parent, 0) & mark != mark:
                flags[parent] = flags.get(parent, 0) | mark
                push(parent)  # again when it gains a flag, as git's queue holds it again
    return [oid for oid in found if not flags[oid] & stale]


def walk(repo: Repository, tips: Sequence[Tip], limit: int | None = None) -> Iterator[CommitInfo]:
    """The commits the tips that are not excluded reach along first parents, less those an
    excluded tip reaches through any parent, newest commit first (of one time, in the order
    they were queued), as `git log --first-parent` lists them."""
    if limit == 0:
        return
    commits = list(dict.fromkeys(tip.commit for tip in tips))
    excluded = {tip.commit for tip in tips if tip.excluded}
    if len(commits) == 1 and not excluded:
        yield from repo.walk(commits[0], limit)  # one line of history: nothing to order
        return
    state = _Walk(repo, commits, excluded)
    if excluded:
        # As git's limit_list: a commit listed may turn out excluded later in the walk (its
        # time was skewed), so nothing is listed until the walk is done.
        yield from itertools.islice(state.limited(), limit)
    else:
        yield from state.unlimited(limit)


class _Walk:
    """One walk's state: the commits read, those excluded, and the queue, newest first."""

    def __init__(self, repo: Repository, commits: list[str], excluded: set[str]) -> None:
        self.repo = repo
        self.infos: dict[str, CommitInfo] = {}
        self.excluded = set(excluded)
        self.queue: list[tuple[int, int, str]] = []  # (-commit time, order queued, id)
        self.queued: set[str] = set()
        self.seen: set[str] = set()
        self.order = itertools.count()
        self.interesting: str | None = None  # a queued commit last found not excluded
        for oid in commits:
            self.read(oid)
        for oid in commits:
            if oid in self.excluded:
                self.exclude_parents(oid)
        for oid in commits:
            self.push(oid)

    def read(self, oid: str) -> CommitInfo:
        """Commit `oid`, read once."""
        info = self.infos.get(oid)
        if info is None:
            info = self.infos[oid] = self.repo.commit_info(oid)
        return info

    def push(self, oid: str) -> None:
        """Queue a commit read before, once for the whole walk."""
        self.seen.add(oid)
        self.queued.add(oid)
        heapq.heappush(self.queue, (-self.infos[oid].time, next(self.order), oid))

    def pop(self) -> str:
        """The newest queued commit (of one time, the first queued)."""
        *_key, oid = heapq.heappop(self.queue)
        self.queued.discard(oid)
        return oid

    def exclude_parents(self, oid: str) -> None:
        """Exclude the parents of `oid`, and the parents of those already read, all the way."""
        todo = list(self.infos[oid].parents)
        while todo:
            one = todo.pop()
            if one not in self.excluded:
                self.excluded.add(one)
                if one in self.infos:
                    todo.extend(self.infos[one].parents)

    def process_parents(self, oid: str) -> None:
        """Queue the parents of a commit taken from the queue: an excluded one's every parent
        (excluded too), another's first."""
        parents = self.infos[oid].parents
        if oid in self.excluded:
            for parent in parents:
                self.excluded.add(parent)
                self.read(parent)
                self.exclude_parents(parent)
                if parent not in self.seen:
                    self.push(parent)
        elif parents and parents[0] not in self.seen:
            self.read(parents[0])
            self.push(parents[0])

    def limited(self) -> Iterator[CommitInfo]:
        """The whole walk, as git's limit_list: it ends SLOP commits after every queued commit
        is excluded and older than the last one listed."""
        listed: list[str] = []
        last: int | None = None  # the time of the last commit listed
        slop = SLOP
        while self.queue:
            oid = self.pop()
            self.process_parents(oid)
            if oid not in self.excluded:
                last = self.infos[oid].time
                listed.append(oid)
            elif (slop := self.still_interesting(last, slop)) == 0:
                break
        return (self.infos[oid] for oid in listed if oid not in self.excluded)

    def still_interesting(self, last: int | None, slop: int) -> int:
        """The slop left: SLOP while a queued commit is newer than `last` or not excluded."""
        if not self.queue:
            return 0
        if last is not None and last <= -self.queue[0][0]:
            return SLOP
        cached = self.interesting
        if cached is not None and cached in self.queued and cached not in self.excluded:
            return SLOP
        for *_key, oid in self.queue:
            if oid not in self.excluded:
                self.interesting = oid
                return SLOP
        return slop - 1

    def unlimited(self, limit: int | None) -> Iterator[CommitInfo]:
        """The walk when nothing is excluded: each commit is listed as it leaves the queue."""
        for _ in itertools.count() if limit is None else range(limit):
            if not self.queue:
                return
            oid = self.pop()
            self.process_parents(oid)
            yield self.infos.pop(oid)  # never needed again: memory stays flat on long histories
