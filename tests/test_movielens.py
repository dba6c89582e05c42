"""MovieLens: real ml-100k statistics, every official format, verified downloads."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from common.data import movielens as ml
from common.data.dataset import InteractionData, tie_keys
from common.data.download import DataIntegrityError, extract_zip
from common.data.movielens import Archive, load_movielens


def test_ml100k_statistics(ml100k: InteractionData) -> None:
    assert (ml100k.num_users, ml100k.num_items, ml100k.num_interactions) == (943, 1682, 100_000)
    users, items = ml100k.user_features, ml100k.item_features
    assert ml100k.item_title[0] == "Toy Story (1995)" and items["year"].raw()[0] == 1995
    assert items["genres"].raw()[0] == ["Animation", "Children's", "Comedy"]
    assert [users[f].raw()[0] for f in ("age", "age_bucket", "gender", "occupation", "zip_region")] == [
        24.0,
        "18",
        "M",
        "technician",
        "8",
    ]  # 24, M, technician, 85711
    assert users["occupation"].cardinality == 21 and items["genres"].cardinality == 19
    assert items["year"].buckets()[0] == 1 + (1995 - 1920) // 5
    # Canonical order: per user by time, ties by the split's SHA-256 tie key.
    u, t, i = ml100k.user, ml100k.timestamp, ml100k.item
    same = u[1:] == u[:-1]
    assert (np.diff(u) >= 0).all()
    assert (t[1:][same] >= t[:-1][same]).all()
    tie = same & (t[1:] == t[:-1])
    key = tie_keys(ml100k.user_raw_ids[u], ml100k.item_raw_ids[i])
    assert (key[1:][tie] > key[:-1][tie]).all()
    assert set(users["age_bucket"].values.tolist()) <= set(range(7))


def _write_official_ml100k_zip(ds: InteractionData, path: Path) -> None:
    """ml-100k.zip in GroupLens's own layout, built from the parsed data."""
    u_data = "".join(
        f"{ds.user_raw_ids[u]}\t{ds.item_raw_ids[i]}\t{int(r)}\t{t}\n"
        for u, i, r, t in zip(ds.user, ds.item, ds.rating, ds.timestamp)
    )
    items = []
    year, genres = ds.item_features["year"].raw(), ds.item_features["genres"].raw()
    genre_names = list(ml.ML100K_GENRES)
    for k, raw in enumerate(ds.item_raw_ids):
        flags = ["1" if g in genres[k] else "0" for g in genre_names]
        date = f"01-Jan-{int(year[k])}" if year[k] else ""
        items.append("|".join([str(raw), ds.item_title[k], date, "", "http://example.invalid/", *flags]))
    # The canonical form keeps the zip's region (first digit), so any zip in the region will do.
    f = {name: feat.raw() for name, feat in ds.user_features.items()}
    users = [
        f"{raw}|{int(f['age'][k])}|{f['gender'][k]}|{f['occupation'][k]}|"
        f"{f['zip_region'][k] + '0000' if f['zip_region'][k] != 'other' else 'T8H1N'}"
        for k, raw in enumerate(ds.user_raw_ids)
    ]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ml-100k/u.data", u_data)
        zf.writestr("ml-100k/u.item", ("\n".join(items) + "\n").encode("latin-1"))
        zf.writestr("ml-100k/u.user", "\n".join(users) + "\n")


def _publish(monkeypatch: pytest.MonkeyPatch, name: str, path: Path, size: int | None = None) -> None:
    """Make ``path`` the published archive for ``name`` (its md5 and size)."""
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    monkeypatch.setitem(ml.ARCHIVES, name, Archive(path.name, md5, size or path.stat().st_size))


@pytest.fixture
def served_ml100k(ml100k: InteractionData, http_dir, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The official-format ml-100k.zip, published (checksums patched) and served on loopback."""
    served, url = http_dir
    _write_official_ml100k_zip(ml100k, served / "ml-100k.zip")
    _publish(monkeypatch, "ml-100k", served / "ml-100k.zip")
    monkeypatch.setenv("RECSYS_MOVIELENS_BASE_URL", url)
    return served / "ml-100k.zip"


def test_grouplens_format_matches_recbole(
    ml100k: InteractionData, served_ml100k: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got = load_movielens("ml-100k", tmp_path / "cache", source="grouplens")
    assert got.source == "grouplens"
    assert got.fingerprint == ml100k.fingerprint
    assert got.item_title == ml100k.item_title
    for side in ("user_features", "item_features"):
        a, b = getattr(got, side), getattr(ml100k, side)
        assert list(a) == list(b) and all(a[n].raw() == b[n].raw() and a[n].vocab == b[n].vocab for n in a)
    # Cached now: no server needed the second time.
    monkeypatch.setenv("RECSYS_MOVIELENS_BASE_URL", "http://127.0.0.1:9")
    assert load_movielens("ml-100k", tmp_path / "cache", source="grouplens").fingerprint == ml100k.fingerprint


def test_truncated_download_is_detected_and_never_used(
    ml100k: InteractionData, http_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served, url = http_dir
    good = tmp_path / "ml-100k.zip"
    _write_official_ml100k_zip(ml100k, good)
    _publish(monkeypatch, "ml-100k", good)
    (served / "ml-100k.zip").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # cut mid-transfer
    monkeypatch.setenv("RECSYS_MOVIELENS_BASE_URL", url)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="expected .* bytes"):
        load_movielens("ml-100k", cache, source="grouplens")
    assert not any(cache.glob("ml-100k.zip*")), "a partial download was left in the cache"
    assert not (cache / "ml-100k").exists()


def test_corrupt_download_with_right_size_is_rejected(
    ml100k: InteractionData, http_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served, url = http_dir
    good = tmp_path / "ml-100k.zip"
    _write_official_ml100k_zip(ml100k, good)
    _publish(monkeypatch, "ml-100k", good)
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    (served / "ml-100k.zip").write_bytes(bytes(data))
    monkeypatch.setenv("RECSYS_MOVIELENS_BASE_URL", url)
    with pytest.raises(RuntimeError, match="md5 is"):
        load_movielens("ml-100k", tmp_path / "cache", source="grouplens")
    # auto falls back to the verified recbole copy rather than using the corrupt file.
    fallback = load_movielens("ml-100k", tmp_path / "cache", source="auto")
    assert fallback.source == "recbole" and fallback.fingerprint == ml100k.fingerprint


def test_corrupt_cached_archive_is_moved_aside_and_refetched(
    ml100k: InteractionData, served_ml100k: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "ml-100k.zip").write_bytes(b"not a zip")
    got = load_movielens("ml-100k", cache, source="grouplens")
    assert got.fingerprint == ml100k.fingerprint
    assert (cache / "ml-100k.zip.corrupt").read_bytes() == b"not a zip"


def test_interrupted_extraction_is_redone(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("x/data.txt", "payload")
    dest = tmp_path / "out"
    (dest / "x").mkdir(parents=True)
    (dest / "x" / "data.txt").write_text("half")  # no .complete marker: a killed extraction
    extract_zip(archive, dest, marker="m1")
    assert (dest / "x" / "data.txt").read_text() == "payload"
    assert json.loads((dest / ".complete").read_text()) == {
        "marker": "m1",
        "files": {"x/data.txt": {"size": 7, "sha256": hashlib.sha256(b"payload").hexdigest()}},
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_ml1m_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    buf = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(
            "ml-1m/ratings.dat",
            "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n2::3408::2::978300000\n",
        )
        zf.writestr(
            "ml-1m/movies.dat",
            "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
            "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
            "3408::Erin Brockovich (2000)::Drama\n9999::Never Rated (1990)::Comedy\n".encode("latin-1"),
        )
        zf.writestr("ml-1m/users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    os.replace(buf, cache / "ml-1m.zip")
    _publish(monkeypatch, "ml-1m", cache / "ml-1m.zip")
    ds = load_movielens("ml-1m", cache, source="grouplens")
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (2, 3, 4)  # the catalog is rated items
    assert ds.item_title == [
        "James and the Giant Peach (1996)",
        "One Flew Over the Cuckoo's Nest (1975)",
        "Erin Brockovich (2000)",
    ]
    assert ds.item_features["year"].raw() == [1996, 1975, 2000]
    assert ds.item_features["genres"].raw()[0] == ["Animation", "Children's", "Musical"]
    assert ds.user_features["occupation"].raw()[0] == "K-12 student"
    assert ds.user_features["age_bucket"].raw() == ["1", "56"] and ds.user_features["gender"].raw() == ["F", "M"]
    # User 1's items by time: 1193 (978300760) after 661 (978302109)? No: 1193 is earlier.
    assert [ds.item_raw_ids[i] for i in ds.item[ds.user == 0]] == [1193, 661]


def test_ml25m_csv_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(
            "ml-25m/ratings.csv",
            "userId,movieId,rating,timestamp\n1,296,5.0,1147880044\n1,306,3.5,1147868817\n3,296,0.5,1147880000\n",
        )
        zf.writestr(
            "ml-25m/movies.csv",
            "movieId,title,genres\n296,Pulp Fiction (1994),Comedy|Crime|Drama|Thriller\n"
            '306,"Three Colors: Red (Trois couleurs: Rouge) (1994)",Drama\n'
            '307,"Big, Hairy (2001)",(no genres listed)\n',
        )
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "ml-25m.zip").write_bytes(buf.getvalue())
    _publish(monkeypatch, "ml-25m", cache / "ml-25m.zip")
    ds = load_movielens("ml-25m", cache, source="grouplens")
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (2, 2, 3)
    assert ds.item_title == ["Pulp Fiction (1994)", "Three Colors: Red (Trois couleurs: Rouge) (1994)"]
    assert not ds.has_user_features and ds.rating.min() == 0.5
    assert list(ds.item_features) == ["genres", "year"]


def test_bad_arguments_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'ml-2k'"):
        load_movielens("ml-2k", tmp_path)
    with pytest.raises(ValueError, match="only ships ml-100k"):
        load_movielens("ml-1m", tmp_path, source="recbole")


def test_unreachable_grouplens_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_MOVIELENS_BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(RuntimeError, match="RECSYS_MOVIELENS_BASE_URL"):
        load_movielens("ml-1m", tmp_path)


def test_recbole_files_are_verified(tmp_path: Path, ml100k: InteractionData) -> None:
    folder = ml.fetch_recbole_ml100k(tmp_path)
    inter = folder / "ml-100k.inter"
    inter.write_bytes(inter.read_bytes()[:-100])  # damaged after extraction
    (folder / ".complete").unlink()  # ... and the marker gone: re-extracted from the wheel
    assert load_movielens("ml-100k", tmp_path, source="recbole").fingerprint == ml100k.fingerprint


def test_extract_zip_rejects_missing_member(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("x.txt", "1")
    with pytest.raises(DataIntegrityError, match="no member 'y.txt'"):
        extract_zip(archive, tmp_path / "out", members={"y.txt": "y.txt"})


def test_prepare_data_cli_prints_and_writes_statistics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from common.prepare_data import main

    stats = main(["--out", str(tmp_path)])
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100_000)
    assert stats["train_interactions"] == 98_114 and stats["test_users"] == 943
    assert "943 users, 1682 items, 100000 interactions" in capsys.readouterr().out
    assert (tmp_path / "results.json").is_file()


def _cache_with_recbole(tmp_path: Path) -> Path:
    """A private data cache holding the recbole wheel (copied from the session's cache when there)."""
    import shutil

    from common.data.download import default_data_dir

    cache = tmp_path / "cache"
    wheels = default_data_dir() / "wheels"
    if wheels.is_dir():
        shutil.copytree(wheels, cache / "wheels")
    ml.fetch_recbole_ml100k(cache)
    return cache


@pytest.mark.parametrize("damage", ["truncate", "half_the_lines", "same_size_edit"])
def test_a_damaged_cache_file_is_noticed_and_extracted_again(
    tmp_path: Path, ml100k: InteractionData, damage: str, capsys
) -> None:
    """Issue 17.2: the .complete manifest records every extracted file's size and SHA-256."""
    cache = _cache_with_recbole(tmp_path)
    inter = cache / "ml-100k-recbole" / "ml-100k.inter"
    data = inter.read_bytes()
    if damage == "truncate":
        inter.write_bytes(data[: len(data) // 3])
    elif damage == "half_the_lines":
        inter.write_bytes(b"\n".join(data.split(b"\n")[::2]))
    else:
        inter.write_bytes(data.replace(b"\t5\t", b"\t1\t", 1))
        assert inter.stat().st_size == len(data)
    got = load_movielens("ml-100k", cache)
    assert got.num_interactions == 100_000 and got.fingerprint == ml100k.fingerprint
    assert f"cached {inter} " in capsys.readouterr().err
    assert inter.read_bytes() == data


def test_data_problems_are_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from common.prepare_data import main as prepare

    monkeypatch.setenv("RECSYS_MOVIELENS_BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9

    def offline(*args, **kwargs):
        raise ConnectionError("`pip download ...` failed:\nERROR: No matching distribution found for recbole==1.2.1")

    monkeypatch.setattr(ml, "pip_download", offline)
    with pytest.raises(SystemExit) as exit_info:  # offline, empty cache
        prepare(["--data-dir", str(tmp_path / "empty")])
    message = str(exit_info.value)
    assert message.startswith("error: ml-100k is not in the cache") and "\n" not in message
    assert "No matching distribution" in message and "connect to PyPI" in message

    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    with pytest.raises(SystemExit, match="has a file where a folder belongs"):
        prepare(["--data-dir", str(a_file)])


def test_a_read_only_cache_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from common.data import download
    from common.prepare_data import main as prepare

    cache = tmp_path / "ro"
    cache.mkdir()
    if (download.default_data_dir() / "wheels").is_dir():  # the wheel is cached: no network is asked
        shutil.copytree(download.default_data_dir() / "wheels", cache / "wheels")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(cache))

    monkeypatch.setattr(download.tempfile, "mkdtemp", read_only)  # root ignores chmod, so fail the write itself
    with pytest.raises(SystemExit, match="cannot write to the data cache .*Permission denied.*writable folder"):
        prepare(["--data-dir", str(cache), "--source", "recbole"])
