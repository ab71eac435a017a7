"""psm.atomic: every output is written through a temporary sibling and a rename, with the umask's mode."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from psm.atomic import atomic_path, make_shared_dir, write_bytes_atomic, write_text_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_outputs_get_the_umask_mode_and_leave_no_temporary(tmp_path, umask_022):
    text = write_text_atomic(tmp_path / "a" / "m.json", "{}\n")  # the folder is created too
    data = write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01", durable=False)
    with atomic_path(tmp_path / "c.tif", suffix=".tif") as tmp:
        assert tmp.suffix == ".tif" and tmp.parent == tmp_path and tmp.name.startswith(".c.tif.")
        tmp.write_bytes(b"tiff")
    folder = make_shared_dir(tmp_path, ".cache.")
    for path in (text, data, tmp_path / "c.tif"):
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert folder.stat().st_mode & 0o777 == 0o755
    assert text.read_text() == "{}\n" and data.read_bytes() == b"\x00\x01"
    assert not [p for p in tmp_path.rglob(".*") if p != folder]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer failed")
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]


def test_psm_data_split_output_keeps_the_usual_mode(tmp_path, umask_022):
    # write_split used mkstemp: rewriting a manifest in place made it private (0600).
    from psm.data.split import write_split

    df = pd.DataFrame(
        {
            "key": [f"k{i}" for i in range(40)],
            "latitude": [40 + i % 7 for i in range(40)],
            "longitude": [-74 + i % 5 for i in range(40)],
        }
    )
    src = tmp_path / "m.csv"
    df.to_csv(src, index=False)
    write_split(src, src, cell="10km", min_cell_count=1)
    assert src.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m.csv.split-summary.json").stat().st_mode & 0o777 == 0o644
