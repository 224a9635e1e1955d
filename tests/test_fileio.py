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


def test_atomic_write_replaces_a_file_or_folder_and_cleans_up_on_error(tmp_path):
    import pytest

    from pokediff.fileio import atomic_write, write_text_atomic

    target = tmp_path / "sub" / "a.json"
    write_text_atomic(target, "1")
    assert target.read_text() == "1"
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_write(target) as tmp:
            assert tmp.parent == target.parent and tmp.suffix == ".json" and tmp.name.startswith(".tmp-a.json-")
            tmp.write_text("2")
            raise RuntimeError("half way")
    assert target.read_text() == "1"  # the old content survives a failed write
    folder = tmp_path / "sub" / "model"
    for content in ("old", "new"):
        with atomic_write(folder) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text(content)
    assert (folder / "config.json").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.json", "model"]  # no temporaries left
