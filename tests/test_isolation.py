"""The suite runs on a plain clone: no test reads the project's ``../shared`` folder (tests/isolation.py)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, TEST_DATA
from isolation import OutsideTheClone

SHARED = REPO.parent / "shared"


@pytest.mark.parametrize("relative", ["data/alpaca/DATA_LICENSE", "no/such/file.txt"])
def test_opening_a_file_under_shared_is_refused_whether_or_not_it_exists(relative):
    with pytest.raises(OutsideTheClone, match="fresh clone does not have"):
        open(SHARED / relative)  # noqa: SIM115 (the open itself is what is refused)
    with pytest.raises(OutsideTheClone):
        (SHARED / relative).read_bytes()


def test_listing_shared_and_relative_or_dotted_paths_are_refused(monkeypatch):
    with pytest.raises(OutsideTheClone):
        os.listdir(SHARED)
    with pytest.raises(OutsideTheClone):
        list(os.scandir(REPO / ".." / "shared"))
    monkeypatch.chdir(REPO)
    with pytest.raises(OutsideTheClone):
        open("../shared/data/README.md")  # noqa: SIM115


@pytest.mark.parametrize(
    "argv",
    [
        ["--task-dir", str(SHARED / "data")],
        [f"data.train={REPO / 'assets' / 'tinystories' / 'eval.txt'},{SHARED / 'data' / 'alpaca' / 'x.json'}"],
        ["--data=../shared/data/tinystories"],
    ],
)
def test_a_subprocess_given_a_path_under_shared_is_not_started(argv, tmp_path):
    marker = tmp_path / "started"
    with pytest.raises(OutsideTheClone):
        subprocess.run([sys.executable, "-c", f"open({str(marker)!r}, 'w')", *argv], cwd=REPO, check=False)
    assert not marker.exists()


def test_files_in_the_clone_and_elsewhere_are_read_as_usual(tmp_path):
    assert (TEST_DATA / "alpaca" / "SOURCE.md").read_text().startswith("# Alpaca")
    (tmp_path / "shared").mkdir()  # a folder named shared that is not the project's
    (tmp_path / "shared" / "x.txt").write_text("ok")
    assert (tmp_path / "shared" / "x.txt").read_text() == "ok"
    proc = subprocess.run(
        [sys.executable, "-c", "print('ran')", str(tmp_path / "shared")], capture_output=True, text=True
    )
    assert proc.stdout == "ran\n"


def test_every_test_data_folder_says_where_its_files_come_from():
    folders = [p for p in TEST_DATA.iterdir() if p.is_dir()]
    assert folders
    for folder in folders:
        source = (folder / "SOURCE.md").read_text()
        for data_file in folder.iterdir():
            if data_file.name not in ("SOURCE.md", "LICENSE", "DATA_LICENSE"):
                assert data_file.name in source, f"{folder}/SOURCE.md does not describe {data_file.name}"
        assert "## License" in source, f"{folder}/SOURCE.md has no License section"
