"""Ref resolution for the server: a cache of spec -> commit validated by stat, and a poller that sees refs move.

A request names a ref spec (`main`, `prod`, `main~2`, an abbreviated id). Resolving it through the
store reads a ref file and peels an object; doing that per request is wasteful, and scanning every
ref is out of the question with 10^6 per-user branches. So each resolved spec is cached together
with the stat signature (inode, size, mtime) of the few files that can change its answer: the loose
ref files it was looked up in, and `packed-refs`. (A full commit id names that commit whatever ref
shares its digits; its entry watches the same files, and the object store too: the pack directory,
the object's loose file, and the count of packs the store let go of, so that a commit pruned since
is looked up again, in the packs listed anew, once a gc deletes the pack or file that held it. An
abbreviated id depends on every object that may come to share its digits, so it is not cached.) A request revalidates its entry with those two or three `stat` calls, so it sees the ref's value at admission exactly; the poller stats the same files
for every spec in use every ~150 ms, re-reads the ref values once a second (a guard against a
rename that reuses an inode within one timestamp tick), and reports moves so that the server can
prefetch the new revision before requests ask for it. Only specs requested in the last minute
are polled (others are revalidated on their next request), on a worker thread, so that polling
10^4 per-user branches neither blocks the event loop nor takes over a core.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from mintvcs.errors import MintError
from mintvcs.ids import is_object_id
from mintvcs.refs import SYMREF_MAXDEPTH
from mintvcs.store import UnknownRevisionError, is_full_hex, ref_candidates

log = logging.getLogger("mintvcs.serve")

StatKey = tuple[int, int, int] | None
# Deleted refs' specs remembered (RefWatcher._gone), ~1.5 KB each: a ref made again after
# this many other deletions is taken for a new one.
_MAX_BURIED = 4096
_SUFFIX = re.compile(r"[~^]|@\{")  # where a spec's ref name ends: `main~1`, `main@{1}`
_MAX_SPEC = 1024


class InvalidRefSpec(MintError):
    """A ref spec the server refuses before resolving (empty, too long, `..`, control characters)."""


def check_spec(spec: object) -> str:
    """The spec as a string, or InvalidRefSpec when it is not one the store could ever accept."""
    if not isinstance(spec, str) or not spec:
        raise InvalidRefSpec(f'ref must be a non-empty string, got {spec!r}; send e.g. "main"')
    if len(spec) > _MAX_SPEC:
        raise InvalidRefSpec(f"ref is {len(spec)} characters long; the limit is {_MAX_SPEC}")
    if ".." in spec:
        raise InvalidRefSpec(
            f"ref {spec!r} holds '..'; name one branch, tag or commit (ranges are not served)"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in spec):
        raise InvalidRefSpec(
            f"ref {spec!r} holds control characters; send a plain branch, tag or commit id"
        )
    return spec


def _stat(path: str) -> StatKey:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:  # a name no ref can have
            return None
        # A file that cannot be stat'ed (a symlink loop, no permission) is a state of its own:
        # its spec resolves to the store's error, and the poll goes on for every other spec.
        return (-1, -1, -(err.errno or 1))
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Resolution:
    """What a spec meant at one moment: the commit, and the full ref name it went through (None for an id)."""

    spec: str
    commit: str
    ref: str | None


def names_an_ancestor(spec: str) -> bool:
    """True for a spec with a suffix (`main~1`, `main@{1}`): its commit is not its ref's value."""
    return _SUFFIX.search(spec) is not None


def metric_label(ref: str | None) -> str:
    """The metrics label of a request or move: the branch or tag it went through, "(commit)" for ids.

    Labelling by the spec as sent would let clients mint series without bound (`main~0^0~0`,
    abbreviated ids of every length all name one commit); refs bound the label set.
    """
    if ref is None:
        return "(commit)"
    short = ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
    # git allows a branch named "(base)": such a ref keeps its full name, so that it never
    # shares a series with the server's own parenthesised labels.
    return ref if short.startswith("(") else short


@dataclass(frozen=True)
class RefMove:
    """A spec in use whose commit changed; `new` None: its ref was deleted, and `old` is what
    the ref named (not the spec: `x~1`'s deletion is x's)."""

    spec: str
    ref: str | None
    old: str
    new: str | None


@dataclass
class _Entry:
    resolution: Resolution
    name: str  # the spec's ref name (`main` of `main~2`)
    deps: tuple[tuple[str, StatKey], ...]
    raw: str | None  # the ref's own value when resolved (before ~N), for the periodic re-read
    used: float
    # A full commit id's: the store's packs_let_go() before it was looked up (None for others).
    packs_let_go: int | None = None


class RefWatcher:
    """Resolve specs through a stat-validated cache; `poll()` finds the specs in use whose commit moved."""

    def __init__(
        self,
        repo: Any,
        *,
        max_entries: int = 65536,
        max_spec_chars: int = 4 << 20,
        idle_forget_s: float = 600.0,
        active_s: float = 60.0,
        on_move: Callable[[RefMove], None] | None = None,
    ) -> None:
        self.repo = repo
        # The poller watches specs requested in the last active_s seconds; older cached ones are
        # still revalidated by stat on their next request, so none is ever served stale.
        self.active_s = active_s
        # Told of every move, whether the poller or a request's revalidation saw it first.
        self.on_move = on_move
        self.git_dir = os.fspath(repo.git_dir)
        self.max_entries = max_entries
        # The characters of the cached specs, at most, besides their count: a spec may be 1024
        # characters (`main~0~0...`, one commit spelled 500 ways), and 65,536 of those held
        # ~200 MB with their entries. Names as refs are spelled (tens of characters) fit
        # max_entries of them within it.
        self.max_spec_chars = max_spec_chars
        self._spec_chars = 0
        self.idle_forget_s = idle_forget_s
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # What a spec named before its ref was deleted (_bury), so that the ref made again
        # elsewhere (`branch -D x; branch x other`) is reported as the move it is.
        self._gone: OrderedDict[str, tuple[_Entry, float]] = OrderedDict()  # with when buried
        # The cached specs by the names a notify may give for them (_keys): a notify for one
        # of 10^5 per-user branches finds its specs without scanning the cache under the lock.
        self._by_key: dict[tuple[str, str], set[str]] = {}
        # Requests resolve on the event loop, the poller may run elsewhere: one lock for the cache.
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self.moves = 0

    # -- resolving ------------------------------------------------------------------------------
    def _candidates(self, name: str) -> list[str]:
        """Ref names the store may read for `name`, in its order, with symbolic targets appended."""
        names = ref_candidates(name)
        for ref in list(names):
            # Each link of a symbolic chain (`al2 -> al -> main`), as deep as git follows one.
            for _ in range(SYMREF_MAXDEPTH):
                try:
                    ref = self.repo.refs.read_symbolic(ref)
                except MintError:
                    break
                if ref is None or ref in names:
                    break
                names.append(ref)
        return names

    def _deps(
        self, names: list[str], reflog: bool = False, commit_id: str | None = None
    ) -> tuple[tuple[str, StatKey], ...]:
        paths = [os.path.join(self.git_dir, n) for n in names]
        paths.append(os.path.join(self.git_dir, "packed-refs"))
        if reflog:  # `main@{1}` names what the reflog says, which expire and delete rewrite
            paths += [os.path.join(self.git_dir, "logs", n) for n in names]
        if commit_id is not None:
            # Where the object is: a gc that prunes it deletes its loose file or rewrites the
            # pack directory (whose mtime changes as a pack is added or deleted).
            objects = os.path.join(self.git_dir, "objects")
            paths.append(os.path.join(objects, "pack"))
            paths.append(os.path.join(objects, commit_id[:2], commit_id[2:]))
        return tuple((p, _stat(p)) for p in paths)

    def read_ref(self, ref: str | None) -> str | None:
        """The value of `ref` now (None for no ref, or one that is missing or unreadable)."""
        if ref is None:
            return None
        try:
            value: str | None = self.repo.refs.read(ref)
        except MintError:
            return None
        return value

    def _resolve_uncached(self, spec: str) -> _Entry:
        name = _SUFFIX.split(spec, maxsplit=1)[0]
        names = self._candidates(name)
        commit_id = name.lower() if is_full_hex(name) else None
        # Stat first, then read: a move in between leaves a stale signature, so the next check re-resolves.
        deps = self._deps(names, reflog="@{" in spec, commit_id=commit_id)
        packs_let_go = None
        if commit_id is not None:
            # The store lists its packs again only on a miss: a pack a gc deleted, still
            # listed (and mapped), would find the pruned commit, and the entry would keep it.
            # The count after the listing: a pack let go of from now on makes the entry stale.
            self.repo.release_removed_packs()
            packs_let_go = self.repo.packs_let_go()
        commit = str(self.repo.resolve(spec))
        # The first candidate that exists is the ref the store went through; None means a commit
        # id (a full one names that commit whatever ref shares its digits, as the store reads it).
        found = (n for n in names if self.read_ref(n) is not None)
        ref = None if commit_id is not None else next(found, None)
        return _Entry(
            Resolution(spec, commit, ref),
            name,
            deps,
            self.read_ref(ref),
            time.monotonic(),
            packs_let_go,
        )

    def ref_of(self, name: str) -> str | None:
        """The ref that resolve() goes through for `name` (a spec without suffix): None for a
        full commit id, which names that object, or for a name no ref has. Read without
        resolving or caching: what a listing asks of each name it offers."""
        if is_full_hex(name):
            return None
        return next((n for n in ref_candidates(name) if self.read_ref(n) is not None), None)

    @staticmethod
    def _cacheable(entry: _Entry) -> bool:
        """False for an abbreviated id: a new object sharing its digits makes it ambiguous (an
        error, as in the CLI) and nothing the entry could stat would tell; it is resolved
        afresh on each request (a prefix search of the packs' indexes, no object read)."""
        return entry.resolution.ref is not None or is_full_hex(entry.name)

    def _fresh(self, entry: _Entry, stats: dict[str, StatKey] | None = None) -> bool:
        """Whether the entry's files are as when it was resolved, and for a commit id whether
        the store has let go of no pack since; `stats` memoizes one pass's stat calls (many
        specs share packed-refs and their ref's file)."""
        # A counter, not a file: a pack the server's timer releases (it was deleted, on a file
        # system whose directory mtime did not tell) may have been what found the commit.
        if entry.packs_let_go is not None and entry.packs_let_go != self.repo.packs_let_go():
            return False
        for path, key in entry.deps:
            if stats is None:
                now = _stat(path)
            elif path in stats:
                now = stats[path]
            else:
                now = stats[path] = _stat(path)
            if now != key:
                return False
        return True

    def cached(self, spec: str) -> Resolution | None:
        """`spec`'s resolution if the cache holds it and its files have not changed (a few stat
        calls), else None: what may run on an event loop, where resolve() may walk a history."""
        check_spec(spec)
        if "@{-" in spec:
            return None
        with self._lock:
            entry = self._entries.get(spec)
            if entry is None or not self._fresh(entry):
                return None
            entry.used = time.monotonic()
            self._entries.move_to_end(spec)
            self.hits += 1
            return entry.resolution

    def resolve(self, spec: str) -> Resolution:
        """The commit `spec` names now (raises the store's UnknownRevisionError when it names nothing)."""
        hit = self.cached(spec)
        if hit is not None:
            return hit
        if "@{-" in spec:
            # The branch checked out N switches ago: no file of the entry's would change when
            # that branch moves, so such a spec is resolved afresh every time, never cached.
            return Resolution(spec, str(self.repo.resolve(spec)), "HEAD")
        # Outside the lock: `main~40000` walks a long history, and requests for cached specs
        # (cached(), on the event loop) must not wait for it.
        entry = self._resolve_uncached(spec)
        if not self._cacheable(entry):
            with self._lock:
                self.misses += 1
                if spec in self._entries:  # it named a ref that is gone now
                    self._drop(spec)
            return entry.resolution
        return self._store(spec, entry).resolution

    def _store(self, spec: str, entry: _Entry) -> _Entry:
        """Cache a fresh resolution of `spec` unless a fresher one came first; report a move."""
        with self._lock:
            self.misses += 1
            old = self._entries.get(spec) or self._gone.get(spec, (None, 0.0))[0]
            current = old if old is not None and self._fresh(old) else None
            if current is not None or not self._fresh(entry):
                # Another thread cached a current answer meanwhile, or the files changed while
                # this one was read: keep what is cached (the next request revalidates).
                return current or entry
            entry.used = time.monotonic()  # resolving may have taken a while: in order of use
            self._put(spec, entry)
            self._gone.pop(spec, None)
            self._entries.move_to_end(spec)
            while self._entries and (
                len(self._entries) > self.max_entries or self._spec_chars > self.max_spec_chars
            ):
                self._drop(next(iter(self._entries)))
            moved = old is not None and old.resolution.commit != entry.resolution.commit
            if moved:
                self.moves += 1
        if moved and old is not None and self.on_move is not None:
            self.on_move(
                RefMove(spec, entry.resolution.ref, old.resolution.commit, entry.resolution.commit)
            )
        return entry

    @staticmethod
    def _keys(entry: _Entry) -> tuple[tuple[str, str], ...]:
        """What refresh() finds the entry by: the ref it went through, and the name it gives."""
        ref = entry.resolution.ref
        return (("name", entry.name),) if ref is None else (("ref", ref), ("name", entry.name))

    def _put(self, spec: str, entry: _Entry) -> None:
        """Cache `entry` for `spec` (in place of any entry it had), indexed by its keys; under the lock."""
        if spec in self._entries:
            self._unindex(spec, self._entries[spec])
        else:
            self._spec_chars += len(spec)
        self._entries[spec] = entry
        for key in self._keys(entry):
            self._by_key.setdefault(key, set()).add(spec)

    def _drop(self, spec: str) -> None:
        """Forget `spec`'s entry and its index keys; under the lock."""
        self._unindex(spec, self._entries.pop(spec))
        self._spec_chars -= len(spec)

    def _bury(self, spec: str) -> RefMove | None:
        """Forget `spec`, which names nothing now, keeping what it named for a ref made again;
        under the lock. The deletion, for on_move, unless the spec went through no ref."""
        entry = self._entries[spec]
        self._drop(spec)
        if entry.resolution.ref is None:
            return None
        self._gone[spec] = (entry, time.monotonic())
        while len(self._gone) > _MAX_BURIED:
            self._gone.popitem(last=False)
        # What the ref itself named (`x~1`'s entry knows x's value too): one deletion however
        # many specs of the ref report it.
        return RefMove(spec, entry.resolution.ref, entry.raw or entry.resolution.commit, None)

    def _unindex(self, spec: str, entry: _Entry) -> None:
        for key in self._keys(entry):
            specs = self._by_key.get(key)
            if specs is not None:
                specs.discard(spec)
                if not specs:
                    del self._by_key[key]

    def refresh(self, ref: str | None = None) -> list[Resolution]:
        """Re-resolve the cached specs that went through `ref` (a full or short name), or all of
        them, reporting moves to on_move; specs that name nothing now are dropped. Returns the
        fresh resolutions (what a hook's notify asks for)."""
        with self._lock:
            if ref is None:
                entries = list(self._entries.items())
            else:
                short = ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
                keys = [("ref", r) for r in (ref, f"refs/heads/{short}", f"refs/tags/{short}")]
                keys += [("name", ref), ("name", short)]
                specs = set().union(*(self._by_key.get(key, ()) for key in keys))
                # Least recently used first, the order the cache keeps them in.
                entries = sorted(
                    ((s, self._entries[s]) for s in specs), key=lambda item: item[1].used
                )
        moves, fresh = self._reresolve(entries)
        if self.on_move is not None:
            for move in moves:
                self.on_move(move)
        return fresh

    def _reresolve(
        self, entries: list[tuple[str, _Entry]]
    ) -> tuple[list[RefMove], list[Resolution]]:
        """Resolve these cached specs afresh and replace their entries: the moves and the resolutions."""
        moves: list[RefMove] = []
        fresh_resolutions: list[Resolution] = []
        for spec, entry in entries:
            try:
                fresh = self._resolve_uncached(spec)
            except MintError as err:
                with self._lock:
                    if self._entries.get(spec) is not entry:
                        continue
                    # The next request gets the error. Only a ref that reads as gone is said
                    # to be deleted: not one that cannot be read, nor a ref whose `~2` or
                    # `@{5}` names nothing now (a reset, an expired reflog).
                    ref = entry.resolution.ref
                    deleted = isinstance(err, UnknownRevisionError) and ref is not None
                    if not (deleted and self.read_ref(ref) is None):
                        self._drop(spec)
                    elif (gone := self._bury(spec)) is not None:
                        moves.append(gone)
                continue
            with self._lock:
                fresh.used = entry.used  # as a request may have set it meanwhile: its place
                if self._entries.get(spec) is entry:
                    if self._cacheable(fresh):
                        self._put(spec, fresh)
                    else:  # its ref is gone and it reads as an abbreviated id now
                        self._drop(spec)
            fresh_resolutions.append(fresh.resolution)
            old, new = entry.resolution.commit, fresh.resolution.commit
            if new != old:
                self.moves += 1
                moves.append(RefMove(spec, fresh.resolution.ref, old, new))
        return moves, fresh_resolutions

    def _recent(self, now: float) -> list[tuple[str, _Entry]]:
        """The (spec, entry) used in the last active_s seconds, least recently used first;
        under the lock."""
        recent = []
        for spec, entry in reversed(self._entries.items()):
            if now - entry.used > self.active_s:
                break  # and so is every entry before it: the cache is in order of use
            recent.append((spec, entry))
        recent.reverse()
        return recent

    def tracked(self) -> list[Resolution]:
        """Resolutions in the cache, least recently used first."""
        with self._lock:
            return [e.resolution for e in self._entries.values()]

    def live(self) -> list[Resolution]:
        """Per ref, the resolution of its most recently requested spec among those the poller
        keeps current (requested in the last active_s seconds, files unchanged)."""
        now = time.monotonic()
        with self._lock:
            entries = [entry for _, entry in self._recent(now)]
        stats: dict[str, StatKey] = {}
        latest: dict[str, Resolution] = {}
        for entry in entries:  # least recently used first: the latest use of a ref wins
            ref = entry.resolution.ref
            if ref is None or names_an_ancestor(entry.resolution.spec):
                continue
            if self._fresh(entry, stats):
                latest[ref] = entry.resolution
        return list(latest.values())

    # -- polling --------------------------------------------------------------------------------
    def poll(self, *, reread: bool = False) -> list[RefMove]:
        """Re-resolve specs whose files changed (or, with reread, whose ref value changed); return the moves."""
        now = time.monotonic()
        with self._lock:
            # The cache is in order of use: the idle are forgotten from the old end, and the
            # specs in use read from the new end, both as far as the first that is not, so that
            # a poll costs what is in use, not the 65,536 specs a burst may have left cached.
            while self._entries:
                spec, entry = next(iter(self._entries.items()))
                if now - entry.used <= self.idle_forget_s:  # full commit ids too
                    break
                self._drop(spec)
            entries = self._recent(now)
        stats: dict[str, StatKey] = {}
        values: dict[str, str | None] = {}  # each ref read once per poll, however many specs use it
        stale: list[tuple[str, _Entry]] = []
        for spec, entry in entries:
            if entry.resolution.ref is None and is_object_id(spec):
                continue  # a full commit id never moves: a request sees it pruned (_fresh)
            changed = not self._fresh(entry, stats)
            ref = entry.resolution.ref
            if not changed and reread and ref is not None:
                if ref not in values:
                    values[ref] = self.read_ref(ref)
                changed = values[ref] != entry.raw
            if changed:
                stale.append((spec, entry))
        return self._reresolve(stale)[0] + self._exhume(now, stats)

    def _exhume(self, now: float, stats: dict[str, StatKey]) -> list[RefMove]:
        """The deleted refs of specs in use that were made again (the moves from what they
        named), for a prefetch before the next request; the others wait for their files to
        change again."""
        buried: list[tuple[str, _Entry]] = []
        with self._lock:
            # Newest first, as far as those buried within active_s: the poller watches only
            # specs requested that recently, and thousands of per-user branches deleted long
            # ago must not cost every poll a pass.
            for spec, (entry, when) in reversed(self._gone.items()):
                if when >= now:  # buried by this poll: just found unresolvable
                    continue
                if now - when > self.active_s:
                    break
                if now - entry.used <= self.active_s and not self._fresh(entry, stats):
                    buried.append((spec, entry))
        moves: list[RefMove] = []
        for spec, entry in buried:
            try:
                fresh = self._resolve_uncached(spec)
            except MintError:
                names = self._candidates(entry.name)
                deps = self._deps(names, reflog="@{" in spec)
                with self._lock:
                    found = self._gone.get(spec)
                    if found is not None and found[0] is entry:
                        self._gone[spec] = (replace(entry, deps=deps), found[1])
                continue
            with self._lock:
                found = self._gone.get(spec)
                if found is None or found[0] is not entry or spec in self._entries:
                    continue
                del self._gone[spec]
                # Back at the new end of the cache: so its use is now, to keep the cache in
                # order of use (the poller reads it from that end as far as the first idle).
                fresh.used = time.monotonic()
                if self._cacheable(fresh):
                    self._put(spec, fresh)
            if fresh.resolution.commit != entry.resolution.commit:
                self.moves += 1
                moves.append(
                    RefMove(
                        spec, fresh.resolution.ref, entry.resolution.commit, fresh.resolution.commit
                    )
                )
        return moves

    async def run(self, *, interval: float = 0.15, reread_every: float = 1.0) -> None:
        """Poll forever, calling on_move on the loop for each move.

        A poll runs on a worker thread: with many specs in use (per-user branches) it is
        milliseconds of stat calls that must not hold up requests, and the next poll waits at
        least twice as long as the last one took, so polling never takes over a core.
        """
        last_reread = time.monotonic()
        took = 0.0
        while True:
            await asyncio.sleep(max(interval, 2 * took))
            now = time.monotonic()
            reread = now - last_reread >= reread_every
            if reread:
                last_reread = now
            try:
                moves = await asyncio.to_thread(self.poll, reread=reread)
            except Exception as err:
                # One failed poll (a store another process is rewriting) must not end polling
                # for the server's life: requests would then only see moves by revalidation.
                log.warning("ref poll failed (%s: %s); polling on", type(err).__name__, err)
                moves = []
            took = time.monotonic() - now
            for move in moves:
                if self.on_move is not None:
                    try:
                        self.on_move(move)
                    except Exception:  # as a failed poll: polling must go on
                        log.exception("reporting a move of %s failed; polling on", move.spec)
