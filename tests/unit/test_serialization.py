"""``megatron_glm.serialization``: restricted loading and the ``latest`` pointer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_glm.serialization import CheckpointFileError, load_file, read_latest_tag


def test_load_file_reads_both_torch_formats_memory_mapped_or_not(tmp_path: Path) -> None:
    blob = {"w": torch.arange(6.0).view(2, 3), "meta": [1, "x", None, (2, 3.5)]}
    for zipped in (True, False):
        path = tmp_path / f"zip{zipped}.pt"
        torch.save(blob, path, _use_new_zipfile_serialization=zipped)
        for mmap in (False, True):
            got = load_file(path, mmap=mmap)
            assert torch.equal(got["w"], blob["w"]) and got["meta"] == blob["meta"]


def test_load_file_names_missing_empty_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointFileError, match=r"/nope\.pt: file not found$"):
        load_file(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointFileError, match=r"/empty\.pt: empty file"):
        load_file(tmp_path / "empty.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    with pytest.raises(CheckpointFileError, match=r"/text\.pt: not a readable checkpoint file"):
        load_file(tmp_path / "text.pt", mmap=True)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"global_step3\n", None),
        (b"..", "is not a checkpoint tag"),
        (b".", "is not a checkpoint tag"),
        (b"a/../global_step3", "is not a checkpoint tag"),
        (str(Path("/tmp").resolve()).encode(), "is not a checkpoint tag"),
        (b"global_step3\x00", "is not a checkpoint tag"),
        (b"\xfe\xff", "not UTF-8 text"),
        (b"global_step9", "names checkpoint 'global_step9', which does not exist"),
    ],
)
def test_latest_must_name_a_directory_inside(
    tmp_path: Path, content: bytes, message: str | None
) -> None:
    (tmp_path / "global_step3").mkdir()
    (tmp_path / "latest").write_bytes(content)
    if message is None:
        assert read_latest_tag(tmp_path) == "global_step3"
    else:
        with pytest.raises(CheckpointFileError, match=message):
            read_latest_tag(tmp_path)
