from pokediff.fileio import swap_into_place


def test_swap_replaces_a_folder_whole_and_leaves_nothing_aside(tmp_path):
    dst = tmp_path / "vae"
    dst.mkdir()
    (dst / "old_only.txt").write_text("old")
    (dst / "config.json").write_text("old")
    new = tmp_path / ".tmp-vae"
    new.mkdir()
    (new / "config.json").write_text("new")
    assert swap_into_place(new, dst) == dst
    assert sorted(p.name for p in dst.iterdir()) == ["config.json"]  # no stale entries from the old folder
    assert (dst / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]  # temp and set-aside folders are gone


def test_swap_moves_into_an_empty_place_and_replaces_files(tmp_path):
    src = tmp_path / "a.tmp"
    src.write_text("1")
    swap_into_place(src, tmp_path / "a.json")
    src.write_text("2")
    swap_into_place(src, tmp_path / "a.json")
    assert (tmp_path / "a.json").read_text() == "2" and not src.exists()
