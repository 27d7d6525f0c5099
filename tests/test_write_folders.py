"""write_folders.check_inside: the one check of where nodes may write."""

from __future__ import annotations

import pytest

from kontext_train.files.write_folders import OutsideAllowedFolders, check_inside


def test_inside_an_allowed_folder_is_accepted(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    assert check_inside(out / "cache" / "sub", [out], "cache_folder") == (out / "cache" / "sub").resolve()
    assert check_inside(out / "a" / ".." / "b", [out], "cache_folder") == (out / "b").resolve()


@pytest.mark.parametrize("escape", ["../elsewhere", "a/../../elsewhere", "/abs/elsewhere"])
def test_outside_is_refused_naming_value_and_folders(tmp_path, escape):
    out = tmp_path / "output"
    out.mkdir()
    with pytest.raises(OutsideAllowedFolders) as err:
        check_inside(out / escape, [out], "cache_folder", escape)
    message = str(err.value)
    assert repr(escape) in message and "cache_folder" in message and str(out.resolve()) in message


def test_a_symlink_leading_out_is_refused_and_a_symlinked_root_accepted(tmp_path):
    out, elsewhere = tmp_path / "output", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "link").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OutsideAllowedFolders):
        check_inside(out / "link" / "cache", [out], "cache_folder")
    # ComfyUI's output folder may itself be a link to another disk.
    root_link = tmp_path / "output_link"
    root_link.symlink_to(out, target_is_directory=True)
    assert check_inside(root_link / "cache", [root_link], "cache_folder") == (out / "cache").resolve()
