"""Format compatibility: manifests and blobs of a newer mintvcs, unknown manifest keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mintvcs.store import Repository
from tests.mintvcs.storekit import (
    WEIGHTS,
    commit_with_manifest_files,
    edit_blob_header,
    mint,
    mint_fails,
)


def _newer_blob(work: Path, change: Any) -> str:
    """Branch `hostile`: HEAD with its first tensor's blob changed by `change` (bytes -> bytes)."""
    repo = Repository.open(work)

    def edit(records: list[dict[str, Any]]) -> None:
        records[0]["blob"] = repo.add_blob(change(repo.read_blob(records[0]["blob"])))

    return commit_with_manifest_files(work, [], edit)


def _encoding(header: dict[str, Any]) -> None:
    header["encoding"] = "fp8block"


def _codec(header: dict[str, Any]) -> None:
    header["segments"][0][0] = "lz4"


def _garbage_codec(header: dict[str, Any]) -> None:
    header["segments"][0][0] = ["zstd"]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda blob: edit_blob_header(blob, version=2), "format version 2; this mintvcs reads 1"),
        (lambda blob: edit_blob_header(blob, _encoding), "encoding 'fp8block'"),
        (lambda blob: edit_blob_header(blob, _codec), "segment codec 'lz4'"),
    ],
)
def test_a_blob_of_a_newer_mintvcs_says_upgrade_not_restore(
    work: Path, change: Any, says: str
) -> None:
    _newer_blob(work, change)
    head = (work / ".mint" / "HEAD").read_text()
    weights = (work / WEIGHTS).read_bytes()
    line = mint_fails(work, "checkout", "-f", "hostile")
    # It said "stored blob is corrupt (...); run mintvcs fsck and restore the object from a
    # clone or backup": nothing is damaged, and a backup holds the same bytes.
    assert says in line and "written by a newer mintvcs" in line, line
    assert line.endswith("upgrade mintvcs to read it") and "corrupt" not in line, line
    assert (work / ".mint" / "HEAD").read_text() == head
    assert (work / WEIGHTS).read_bytes() == weights
    problems = json.loads(mint(work, "fsck", "--json", ok=False).stdout)["problems"]
    assert len(problems) == 1 and "upgrade mintvcs" in problems[0], problems


def test_a_damaged_blob_header_is_still_corrupt(work: Path) -> None:
    _newer_blob(work, lambda blob: edit_blob_header(blob, _garbage_codec))
    line = mint_fails(work, "checkout", "-f", "hostile")
    assert "stored blob is corrupt" in line and "newer" not in line, line


def test_unknown_manifest_keys_are_ignored_in_records_as_at_the_top_level(work: Path) -> None:
    repo = Repository.open(work)
    notes = repo.add_blob(b"notes\n")

    def add_keys(manifest: dict[str, Any]) -> None:
        manifest["compression_hint"] = "fp8"
        manifest["base"]["revision"] = "main"
        for record in manifest["tensors"]:
            record["quant"] = "none"

    extra = {"path": "NOTES.txt", "blob": notes, "executable": False, "mode": "0644"}
    commit_with_manifest_files(work, [extra], edit_manifest=add_keys, in_tree=True)
    weights = (work / WEIGHTS).read_bytes()
    # A tensor or file record's extra key was "corrupt manifest (TensorRecord.__init__() got an
    # unexpected keyword argument 'quant')", while one at the top level was read silently.
    mint(work, "checkout", "-f", "hostile")
    assert (work / WEIGHTS).read_bytes() == weights
    assert (work / "NOTES.txt").read_bytes() == b"notes\n"
    mint(work, "show", "hostile")
    assert json.loads(mint(work, "fsck", "--json").stdout)["problems"] == []


def test_a_manifest_record_without_a_key_names_it(work: Path) -> None:
    def drop(records: list[dict[str, Any]]) -> None:
        del records[0]["depth"]

    commit_with_manifest_files(work, [], drop)
    line = mint_fails(work, "show", "hostile")
    assert "a tensor record lacks depth" in line and "__init__" not in line, line


def test_log_json_lists_a_revision_whose_manifest_is_newer(work: Path) -> None:
    newer = commit_with_manifest_files(work, [], edit_manifest=lambda m: m.update(version=2))
    assert len(mint(work, "log", "--oneline", "hostile").stdout.splitlines()) == 4
    # It printed nothing and exited 1: one newer manifest hid the whole history.
    items = json.loads(mint(work, "log", "--json", "hostile").stdout)
    assert items[0]["commit"] == newer and len(items) == 4
    assert items[0]["meta"] is None
    assert "manifest version 2 is newer than this mintvcs reads (1)" in items[0]["meta_error"]
    assert all("meta_error" not in item and item["meta"] is not None for item in items[1:])
