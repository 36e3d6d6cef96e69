"""Tree entry names git refuses: `.git` and `.gitmodules` under their case, NTFS and HFS+ aliases."""

from __future__ import annotations

import re

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
# NTFS 8.3 short names of `.git` and `.gitmodules` (git's is_ntfs_dotgit / is_ntfs_dotgitmodules).
_NTFS_SHORT = re.compile(r"(?:git~1|gitmod~[1-4])\Z")


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
    if component.isascii() and not component[:5].lower().startswith((".mint", ".git")):
        return False
    return any(name in (".mint", ".git") for name in _folded(component))


def git_special_name(component: str) -> str | None:
    """Why git would refuse `component` (one path segment) in a tree, or None when it accepts it.

    git fsck (and every clone or push with transfer.fsckObjects) rejects `.git` in any case or
    file-system alias, and checks `.gitmodules` as submodule configuration: an adapter's tensor
    or file must never be stored under such a name.
    """
    if component.isascii() and not component[:7].lower().startswith((".git", "git~", "gitmod~")):
        return None  # every tensor name of a real adapter: checked on each manifest read
    folded, ntfs = _folded(component)
    for special in (".git", ".gitmodules"):
        if special in (folded, ntfs):
            return (
                f"git reads {component!r} as {special}; git fsck and fsck-checking clones refuse it"
            )
    if _NTFS_SHORT.match(ntfs):
        return f"{component!r} is an NTFS short name of .git or .gitmodules; git fsck refuses it"
    return None
