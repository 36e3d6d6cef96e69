"""Tree entry names git refuses: `.git` and `.gitmodules` under their case, NTFS and HFS+ aliases;
and those a file system would open as another name checkout writes."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

# Code points HFS+ ignores in file names: `.g\u200cit` opens `.git` there (git's is_hfs_dotgit).
_HFS_IGNORED = frozenset(
    chr(c)
    for c in (
        0x200C,
        0x200D,
        0x200E,
        0x200F,
        *range(0x202A, 0x202F),
        *range(0x206A, 0x2070),
        0xFEFF,
    )
)
# NTFS 8.3 short names of `.gitmodules` (git's is_ntfs_dotgit / is_ntfs_dotgitmodules).
_NTFS_SHORT = re.compile(r"gitmod~[1-4]\Z")
_MINT_SHORT = re.compile(r"mint~[0-9]+\Z")


def _folded(component: str) -> tuple[str, str]:
    """The name as HFS+ reads it (ignored code points dropped, any case) and as NTFS does."""
    folded = "".join(c for c in component if c not in _HFS_IGNORED).lower()
    # NTFS drops trailing dots and spaces and reads `name:stream` as `name`.
    return folded, folded.split(":", 1)[0].rstrip(". ")


def repository_dir_name(component: str) -> bool:
    """Whether some file system opens `component` as `.mint` or `.git`: a repository's own directory.

    A checkout must never write one, at any depth: `sub/.mint/hooks/pre-commit` would be a
    repository of its own whose hooks run the next time someone commits in `sub`.
    """
    if component.isascii() and not component[:5].lower().startswith((".mint", ".git", "mint~")):
        return False
    folded, ntfs = _folded(component)
    # `mint~1`: the NTFS short name of `.mint`, as `git~1` is `.git`'s (git_special_name).
    return (
        folded in (".mint", ".git")
        or ntfs in (".mint", ".git")
        or _MINT_SHORT.match(ntfs) is not None
    )


def git_special_name(component: str) -> str | None:
    """Why git would refuse `component` (one path segment) in a tree, or None when it accepts it.

    git fsck (and every clone or push with transfer.fsckObjects) rejects `.git` in any case or
    file-system alias, and checks `.gitmodules` as submodule configuration: an adapter's tensor
    or file must never be stored under such a name.
    """
    if component.isascii() and not component[:7].lower().startswith((".git", "git~", "gitmod~")):
        return None  # every tensor name of a real adapter: checked on each manifest read
    reason = dotgit_reason(component)
    if reason is not None:
        return reason
    folded, ntfs = _folded(component)
    if ".gitmodules" in (folded, ntfs) or _NTFS_SHORT.match(ntfs):
        # git accepts a regular one (fsck --strict parses it as submodule configuration, and
        # refuses it as a symbolic link): a checkout would hand git that configuration.
        return (
            f"git reads {component!r} as .gitmodules, the submodule configuration of a "
            "work tree holding it"
        )
    return None


def dotgit_reason(component: str) -> str | None:
    """Why git fsck (and a fsck-checking clone or push) refuses `component` as a tree entry: it
    is `.git` in another case or under a file-system alias; None when it is no such name."""
    if component.isascii() and not component[:4].lower().startswith((".git", "git~")):
        return None
    folded, ntfs = _folded(component)
    if ".git" in (folded, ntfs):
        return f"git reads {component!r} as .git; git fsck and fsck-checking clones refuse it"
    if ntfs == "git~1":
        return f"{component!r} is an NTFS short name of .git; git fsck refuses it"
    return None


def _short_name(name: str) -> re.Pattern[str]:
    """The NTFS 8.3 short names `name` may get (`adapte~1.jso`), folded: the first six
    characters of its stem, `~` and a number, the first three of its extension."""
    stem, dot, ext = name.lower().rpartition(".")
    if not dot:
        stem, ext = ext, ""
    pattern = re.escape(stem.replace(".", "").replace(" ", "")[:6]) + "~[0-9]+"
    return re.compile(pattern + (r"\." + re.escape(ext[:3]) if ext else "") + r"\Z")


def alias_of(component: str, names: tuple[str, ...]) -> str | None:
    """The one of `names` (lower-case names of files checkout writes) that some file system
    opens `component` as while not being it: in another case (macOS, Windows, a casefold ext4),
    with code points HFS+ ignores, trailing dots or spaces or a `:stream` (NTFS), or as its NTFS
    short name; None when none does. As git's protectHFS and protectNTFS checks guard `.git`."""
    if component in names:
        return None
    folded, ntfs = _folded(component)
    for name in names:
        if name in (folded, ntfs) or _short_name(name).match(ntfs):
            return name
    return None


def colliding_paths(paths: Iterable[str]) -> tuple[str, str] | None:
    """Two of `paths` that some file system opens as one file (they differ only in case, in
    Unicode normalization or code points HFS+ ignores, or in NTFS's trailing dots), or None.
    A checkout there would write the second over the first: one file lost, unseen."""
    seen: dict[str, str] = {}
    for path in paths:
        key = "/".join(_folded(unicodedata.normalize("NFC", part))[1] for part in path.split("/"))
        first = seen.setdefault(key, path)
        if first != path:
            return first, path
    return None
