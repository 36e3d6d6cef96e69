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


class Revisions:
    """What `log`'s arguments name: the tips, and every commit read to find them (those a
    `~N` passes, and those painted down to the merge bases of `A...B`), which the walk reads
    from here. git keeps one cache of the commits it parsed, and an exclusion passes at once
    through every commit in it: a walk that read them again would stop short of that."""

    def __init__(self, repo: Repository, tips: Sequence[Tip] = ()) -> None:
        self.repo = repo
        self.tips = list(tips)
        self.read: dict[str, CommitInfo] = {}
        self.shallow = repo.shallow_commits()  # once for the log, as git reads it

    def commit(self, oid: str) -> CommitInfo:
        """Commit `oid`, read once for the whole log."""
        info = self.read.get(oid)
        if info is None:
            info = self.read[oid] = self.repo.commit_info(oid, self.shallow)
        return info

    def resolve(self, spec: str) -> str:
        """The commit `spec` names, its `~N`/`^N` steps read through this cache, as git's."""
        return self.repo.resolve(spec, commit_info=self.commit)


def split_range(arg: str) -> tuple[str, str, str] | None:
    """(A, '..' or '...', B) of a range argument, an empty side read as HEAD (as git reads
    `..B`, and `..` as HEAD..HEAD); None for an argument that is no range."""
    left, dots, right = arg.partition("..")
    if not dots:
        return None
    if right.startswith("."):
        dots, right = "...", right[1:]
    if ".." in right or right.startswith("."):
        # git's "bad revision 'a..b..c'": name what was given, not the piece left over
        raise UnknownRevisionError(
            f"invalid revision '{arg}': a range is A..B or A...B, of two revisions"
        )
    return _named(arg, left or "HEAD"), dots, _named(arg, right or "HEAD")


def _named(arg: str, spec: str) -> str:
    """`spec`, a revision of argument `arg`, refused (naming `arg`) when nothing names the
    commit its `~`/`^` steps start from: git refuses `^..main` and `~1`, not reading HEAD."""
    if not spec:
        raise UnknownRevisionError(f"invalid revision '{arg}': it names no revision")
    if spec[0] in ("~", "^"):
        raise UnknownRevisionError(
            f"invalid revision '{arg}': no branch, tag or commit id before '{spec[0]}'"
        )
    return spec


def named_specs(arg: str) -> list[str]:
    """The revision specs `arg` names: both sides of a range, the revision of `^A`."""
    sides = split_range(arg)
    if sides is not None:
        return [sides[0], sides[2]]
    return [_named(arg, arg.removeprefix("^"))]


def tips_of(repo: Repository, args: Sequence[str], first: Sequence[Tip] = ()) -> Revisions:
    """The commits `log ARGS` starts from, after `first` (those of `--all`), in git's order
    (it breaks ties of commit time): `A..B` is ^A B, and `A...B` excludes the merge bases of
    A and B before listing A and B."""
    found = Revisions(repo, first)
    for arg in args:
        if not isinstance(arg, str):
            raise TypeError(f"a revision is named by a str, not {type(arg).__name__}: {arg!r:.60}")
        sides = split_range(arg)
        if sides is None:
            excluded = arg.startswith("^")
            spec = _named(arg, arg[1:] if excluded else arg)
            found.tips.append(Tip(found.resolve(spec), excluded))
            continue
        left, dots, right = sides
        a, b = found.resolve(left), found.resolve(right)
        if dots == "...":
            found.tips += [Tip(base, True) for base in merge_bases(found, a, b)]
            found.tips += [Tip(a, False), Tip(b, False)]
        else:
            found.tips += [Tip(a, True), Tip(b, False)]
    return found


# The marks of git's paint_down_to_common: reached from the one commit, from the others,
# reached from a common ancestor (so no better a base than it), and found common.
_ONE, _TWO, _STALE, _FOUND = 1, 2, 4, 8


def merge_bases(revisions: Revisions, a: str, b: str) -> list[str]:
    """The merge bases of `a` and `b` (`git merge-base --all`): the common ancestors, through
    every parent, that no other common ancestor reaches, newest first, found as git's
    get_merge_bases finds them. The commits read stay in `revisions`' cache for the walk."""
    if a == b:
        return [a]
    found, flags = _paint_down_to_common(revisions, a, [b])
    bases = [oid for oid in found if not flags[oid] & _STALE]
    if len(bases) > 1:
        # A skewed clock can pop a common ancestor before the one that reaches it: git then
        # paints from each base to drop those another reaches (remove_redundant).
        redundant: set[str] = set()
        for base in bases:
            if base in redundant:
                continue
            others = [other for other in bases if other != base and other not in redundant]
            _found, marks = _paint_down_to_common(revisions, base, others)
            if marks[base] & _TWO:
                redundant.add(base)
            redundant.update(other for other in others if marks[other] & _ONE)
        bases = [base for base in bases if base not in redundant]
    return bases


def _paint_down_to_common(
    revisions: Revisions, one: str, twos: list[str]
) -> tuple[list[str], dict[str, int]]:
    """git's paint_down_to_common: the commits found reached from both `one` and one of `twos`
    (newest first, of one time in the order found), and the marks painted; it stops once
    every queued commit is marked as reached from a common ancestor."""
    flags = {one: _ONE}
    if not twos:
        return [one], flags
    for two in twos:
        flags[two] = flags.get(two, 0) | _TWO
    queue: list[tuple[int, int, str]] = []  # (-commit time, order queued, id)
    order = itertools.count()
    for oid in (one, *twos):
        heapq.heappush(queue, (-revisions.commit(oid).date, next(order), oid))
    found: list[str] = []
    while any(not flags[oid] & _STALE for *_key, oid in queue):
        *_key, oid = heapq.heappop(queue)
        mark = flags[oid] & (_ONE | _TWO | _STALE)
        if mark == _ONE | _TWO:
            if not flags[oid] & _FOUND:
                flags[oid] |= _FOUND
                found.append(oid)
            mark |= _STALE  # what a common ancestor reaches is no better a base
        for parent in revisions.commit(oid).parents:
            if flags.get(parent, 0) & mark != mark:
                flags[parent] = flags.get(parent, 0) | mark
                info = revisions.commit(parent)
                heapq.heappush(queue, (-info.date, next(order), parent))  # again, as git's
    # git inserts each found commit by date, after those of its time.
    found.sort(key=lambda oid: -revisions.read[oid].date)
    return found, flags


def walk(revisions: Revisions, limit: int | None = None) -> Iterator[CommitInfo]:
    """The commits the tips that are not excluded reach along first parents, less those an
    excluded tip reaches through any parent, newest commit first (of one time, in the order
    they were queued), as `git log --first-parent` lists them."""
    if limit == 0:
        return
    commits = list(dict.fromkeys(tip.commit for tip in revisions.tips))
    excluded = {tip.commit for tip in revisions.tips if tip.excluded}
    if len(commits) == 1 and not excluded:
        yield from revisions.repo.walk(commits[0], limit)  # one line of history: nothing to order
        return
    state = _Walk(revisions, commits, excluded)
    if excluded:
        # As git's limit_list: a commit listed may turn out excluded later in the walk (its
        # time was skewed), so nothing is listed until the walk is done.
        yield from itertools.islice(state.limited(), limit)
    else:
        yield from state.unlimited(limit)


class _Walk:
    """One walk's state: the commits read (with those read to find its tips), those excluded,
    and the queue, newest first."""

    def __init__(self, revisions: Revisions, commits: list[str], excluded: set[str]) -> None:
        self.read = revisions.commit
        self.infos = revisions.read
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

    def push(self, oid: str) -> None:
        """Queue a commit read before, once for the whole walk."""
        self.seen.add(oid)
        self.queued.add(oid)
        heapq.heappush(self.queue, (-self.infos[oid].date, next(self.order), oid))

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
                last = self.infos[oid].date
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
