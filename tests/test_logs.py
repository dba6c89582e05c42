"""Interaction logs of one's own (common/data/logs.py): every format, every error case, the cache,
and the exactness check: ml-100k written as a log and read back is the same data, with the same
split and the same figures from a seeded run."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.synthetic import generate_interactions, synthetic_dataset, truth_of, write_synthetic_log
from common.data.dataset import MISSING, InteractionData
from common.data.load import load_dataset
from common.data.logs import LogError, load_log, read_log, write_log
from common.data.split import split_dataset

SPLIT_ARRAYS = ("train_user", "train_item", "train_time", "valid_user", "valid_item", "test_user", "test_item")


def assert_same_data(a: InteractionData, b: InteractionData) -> None:
    for name in ("user", "item", "rating", "timestamp", "user_raw_ids", "item_raw_ids"):
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert a.item_title == b.item_title and a.fingerprint == b.fingerprint
    for side in ("user_features", "item_features"):
        fa, fb = getattr(a, side), getattr(b, side)
        assert list(fa) == list(fb), side
        for n in fa:
            assert (fa[n].kind, fa[n].vocab, fa[n].center, fa[n].scale, fa[n].boundaries) == (
                fb[n].kind,
                fb[n].vocab,
                fb[n].center,
                fb[n].scale,
                fb[n].boundaries,
            ), n
            assert np.array_equal(fa[n].values, fb[n].values, equal_nan=fa[n].kind == "numeric"), n
            assert (fa[n].lengths is None and fb[n].lengths is None) or np.array_equal(fa[n].lengths, fb[n].lengths)


@pytest.mark.parametrize("fmt,shards", [("parquet", 1), ("parquet", 4), ("csv", 1)])
def test_ml100k_as_a_log_is_the_same_data_and_split(
    ml100k, ml100k_split, tmp_path: Path, fmt: str, shards: int
) -> None:
    spec = write_log(ml100k, tmp_path / "log", fmt=fmt, shards=shards)
    back, report = read_log(spec)
    assert report == {"rows": 100_000, "skipped": {}, "kept": 100_000}
    assert_same_data(ml100k, back)
    split = split_dataset(back)
    for name in SPLIT_ARRAYS:
        assert np.array_equal(getattr(split, name), getattr(ml100k_split, name)), name


def test_a_seeded_run_on_ml100k_as_a_log_gives_the_same_figures(ml100k, tmp_path: Path) -> None:
    """Two-tower, one epoch from seed 0: through the MovieLens adapter and through the log reader
    (Parquet), every validation figure equal to the last digit."""
    from retrieval.two_tower_train import main as train

    spec = write_log(ml100k, tmp_path / "log")
    args = ["--epochs", "1", "--n-boot", "5", "--log-every", "100000", "--no-test"]
    a = train(args + ["--out", str(tmp_path / "a")])
    b = train(args + ["--dataset", str(spec), "--data-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "b")])
    assert a["valid"]["NDCG@10"] > 0.03
    assert a["valid"] == b["valid"] and a["data_fingerprint"] == b["data_fingerprint"]
    manifest = json.loads((tmp_path / "b" / "export" / "manifest.json").read_text())
    assert manifest["dataset"] == str(spec.resolve())  # loadable again from anywhere


def _shop(folder: Path, n_users: int = 60, per_user: int = 8, seed: int = 0) -> Path:
    """A made-up shop: text IDs, ISO 8601 times, a users table missing some users, an items table
    with a brand, tags (a Parquet list) and a price, no titles."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = [f"sku-{k:03d}" for k in range(40)]
    rows = []
    for u in range(n_users):
        t0 = np.datetime64("2026-01-01T00:00:00") + np.timedelta64(int(rng.integers(0, 86_400 * 30)), "s")
        for k in range(per_user):
            t = str(t0 + np.timedelta64(60 * k, "s"))
            rows.append((f"cust-{u:04d}", items[(u + 3 * k + int(rng.integers(0, 3))) % 40], t))
    with open(folder / "clicks.csv", "w") as f:  # times in UTC, written with a zone, as exports do
        f.write("customer,sku,time\n" + "".join(f"{c},{s},{t}Z\n" for c, s, t in rows))
    pq.write_table(
        pa.table(
            {"customer": [f"cust-{u:04d}" for u in range(0, n_users, 2)], "segment": ["gold", "basic"] * (n_users // 4)}
        ),
        folder / "customers.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "sku": items,
                "brand": [f"b{k % 5}" for k in range(40)],
                "tags": [[f"t{k % 3}", f"t{k % 7}"] for k in range(40)],
                "price": [float(5 + k) for k in range(40)],
            }
        ),
        folder / "products.parquet",
    )
    spec = {
        "name": "shop",
        "interactions": {"path": "clicks.csv", "user": "customer", "item": "sku", "timestamp": "time"},
        "users": {"path": "customers.parquet", "id": "customer", "features": {"segment": {"type": "categorical"}}},
        "items": {
            "path": "products.parquet",
            "id": "sku",
            "features": {
                "brand": {"type": "categorical"},
                "tags": {"type": "multi"},
                "price": {"type": "numeric", "boundaries": [10, 20, 30]},
            },
        },
    }
    (folder / "shop.json").write_text(json.dumps(spec))
    return folder / "shop.json"


def test_a_shop_log_with_text_ids_iso_times_and_features(tmp_path: Path) -> None:
    ds, report = read_log(_shop(tmp_path / "shop"))
    assert report["kept"] == 480 and (ds.num_users, ds.num_items) == (60, 40)
    assert ds.user_raw_ids.dtype == object and ds.user_raw_ids[0] == "cust-0000" and ds.item_raw_ids[-1] == "sku-039"
    assert ds.timestamp.min() >= np.datetime64("2026-01-01T00:00:00", "s").astype(np.int64)
    assert (np.diff(ds.timestamp[ds.user == 0]) == 60).all()
    seg = ds.user_features["segment"]
    assert seg.vocab == ("basic", "gold", MISSING)  # odd-numbered customers have no row
    assert seg.raw()[:3] == ["gold", MISSING, "basic"]
    tags, price = ds.item_features["tags"], ds.item_features["price"]
    assert tags.raw()[7] == ["t1", "t0"] and price.buckets()[[0, 5, 15, 25, 39]].tolist() == [1, 2, 3, 4, 4]
    assert ds.item_title is None and ds.title(3) == "sku-003"
    split = split_dataset(ds)
    assert len(split.test_user) == 60 and len(split.train_user) == 360


def test_two_towers_train_and_serve_on_the_shop_log(tmp_path: Path) -> None:
    """Text IDs end to end: features from the log's columns, export, and recommendations by raw ID."""
    from retrieval.two_tower_retrieval import Retriever
    from retrieval.two_tower_train import main as train

    spec = _shop(tmp_path / "shop", n_users=200)
    res = train(
        ["--dataset", str(spec), "--data-dir", str(tmp_path / "cache"), "--epochs", "2", "--n-boot", "5"]
        + ["--batch-size", "64", "--log-every", "100000", "--out", str(tmp_path / "run")]
    )
    assert res["test"]["HR@10"] > res["popularity_test"]["HR@10"]
    manifest = json.loads((tmp_path / "run" / "export" / "manifest.json").read_text())
    names = [f["name"] for f in manifest["candidate_schema"]["sparse"]]
    assert names == ["item_id", "brand", "tags", "price_bucket"]
    assert [f["name"] for f in manifest["query_schema"]["sparse"]] == ["user_id", "segment", "history"]
    r = Retriever(tmp_path / "run" / "export", k=5)
    (rec,) = r.recommend(["cust-0007"])
    assert len(rec.item_ids) == 5 and all(i.startswith("sku-") for i in rec.item_ids)
    (new,) = r.recommend_features([{"user_id": None, "segment": "gold", "history": ["sku-001", "sku-004"]}])
    assert not new.cold_start and "sku-001" not in new.item_ids


def _csv_log(tmp_path: Path, body: str, spec_extra: dict | None = None) -> Path:
    (tmp_path / "log.csv").write_text(body)
    spec = {"interactions": {"path": "log.csv", "user": "u", "item": "i", "timestamp": "t", **(spec_extra or {})}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    return tmp_path / "spec.json"


GOOD = "u,i,t\n1,10,100\n1,11,200\n2,10,150\n"


@pytest.mark.parametrize(
    "body,extra,message",
    [
        (
            "user,i,t\n1,10,100\n",
            {},
            r"log.csv: no column 'u' \(named by interactions in the spec\); the file has \['user', 'i', 't'\]",
        ),
        ("u,i,t\n1,10,100\n,11,200\n", {}, r"log.csv: row 2, column 'u': empty ID; fill it, or pass --on-bad-row skip"),
        (
            "u,i,t\n1,10,100\n1,x7,200\n",
            {"item_type": "int64"},
            r"row 2, column 'i': ID 'x7' is not an integer; declare \"id_type\": \"string\"",
        ),
        ("u,i,t\n1,10,100\n1,11,yesterday\n", {}, r"row 2, column 't': unparsable timestamp 'yesterday'"),
        ("u,i,t\n1,10,100\n1,11,\n", {}, r"row 2, column 't': empty timestamp"),
        ("u,i,t,r\n1,10,100,4\n1,11,200,five\n", {"rating": "r"}, r"row 2, column 'r': rating 'five' is not a number"),
        (GOOD, {"timestamp_unit": "days"}, r"interactions.timestamp_unit must be one of"),
    ],
)
def test_bad_interaction_rows_name_file_row_column_and_fix(
    tmp_path: Path, body: str, extra: dict, message: str
) -> None:
    with pytest.raises(LogError, match=message):
        read_log(_csv_log(tmp_path, body, extra))


def test_bad_spec_and_feature_tables(tmp_path: Path) -> None:
    with pytest.raises(LogError, match="no such dataset spec file; --dataset takes a MovieLens name or a spec path"):
        load_dataset(str(tmp_path / "nope.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(LogError, match="broken.json: not valid JSON"):
        read_log(tmp_path / "broken.json")
    (tmp_path / "s.json").write_text(json.dumps({"interactions": {"path": "x.csv", "user": "u", "item": "i"}}))
    with pytest.raises(LogError, match=r"s.json: interactions: missing 'timestamp'"):
        read_log(tmp_path / "s.json")
    spec = _csv_log(tmp_path, GOOD)
    s = json.loads(spec.read_text())
    (tmp_path / "items.csv").write_text("id,price,kind\n10,3.5,a\n11,cheap,b\n")
    s["items"] = {"path": "items.csv", "id": "id", "features": {"price": {"type": "numeric"}}}
    spec.write_text(json.dumps(s))
    with pytest.raises(LogError, match=r"items.csv: row 2, column 'price': value 'cheap' is not a number"):
        read_log(spec)
    s["items"]["features"] = {"kind": {"type": "categorical", "vocab": ["a"]}}
    spec.write_text(json.dumps(s))
    with pytest.raises(LogError, match=r"row 2, column 'kind': value 'b' is not in the declared vocab"):
        read_log(spec)
    s["items"]["features"] = {"kind": {"type": "set"}}
    spec.write_text(json.dumps(s))
    with pytest.raises(LogError, match="items.features.kind.type must be categorical, multi or numeric, got 'set'"):
        read_log(spec)
    del s["items"]
    spec.write_text(json.dumps(s))
    (tmp_path / "log.csv").unlink()
    with pytest.raises(LogError, match="log.csv: no such file"):
        read_log(spec)


def test_skip_counts_bad_rows_instead(tmp_path: Path, capsys) -> None:
    spec = _csv_log(tmp_path, "u,i,t\n1,10,100\n,11,200\n1,12,soon\n2,10,150\n2,x,160\n", {"item_type": "int64"})
    ds, report = read_log(spec, on_bad_row="skip")
    assert report == {"rows": 5, "skipped": {"user": 1, "item": 1, "timestamp": 1}, "kept": 2}
    assert ds.num_interactions == 2 and "left out 3 interaction rows of 5" in capsys.readouterr().err


def test_the_cache_is_keyed_by_the_inputs(tmp_path: Path) -> None:
    spec = _csv_log(tmp_path, GOOD)
    a = load_log(spec, tmp_path / "cache")
    assert isinstance(a.user, np.ndarray) and len(list((tmp_path / "cache" / "logs").iterdir())) == 1
    b = load_log(spec, tmp_path / "cache")
    assert isinstance(b.user, np.memmap) and b.fingerprint == a.fingerprint
    (tmp_path / "log.csv").write_text(GOOD + "3,12,300\n")
    c = load_log(spec, tmp_path / "cache")
    assert c.num_interactions == 4 and len(list((tmp_path / "cache" / "logs").iterdir())) == 2


def test_the_synthetic_generator_writes_a_log_that_reads_back_as_itself(tmp_path: Path) -> None:
    d = generate_interactions(1000, 300, seed=3)
    spec = write_synthetic_log(d, tmp_path / "syn", shards=3)
    assert len(list((tmp_path / "syn" / "interactions").glob("*.parquet"))) == 3
    ds = load_log(spec, tmp_path / "cache")
    assert_same_data(ds, synthetic_dataset(d))
    users, items = truth_of(ds)
    assert (users == np.arange(1000)).all()
    assert np.array_equal(items[np.asarray(ds.item)[np.asarray(ds.user) == 0]], d.item[d.user == 0])
    assert len(ds.item_features["price"].boundaries) == 9  # deciles


def test_the_service_request_model_follows_the_data_sets_user_columns(tmp_path: Path) -> None:
    """POST /recommend's "features" for a log: the log's own user columns by name (a categorical's
    values listed in the OpenAPI schema), and MovieLens keeps its raw fields (age, zip)."""
    from types import SimpleNamespace

    from pydantic import ValidationError

    from common.data.movielens import load_movielens
    from common.data.tables import FeatureTables
    from integration.api import request_model, user_record

    def model(ds):
        tables = FeatureTables.from_dataset(ds)
        return request_model(SimpleNamespace(retriever=SimpleNamespace(features=tables), dataset=ds))

    shop = model(read_log(_shop(tmp_path / "shop"))[0])
    req = shop.model_validate({"features": {"segment": "gold", "history": ["sku-003", "sku-004"]}, "k": 5})
    assert user_record(req.features) == {"segment": "gold", "history": ["sku-003", "sku-004"]}
    schema = shop.model_json_schema()
    assert "basic" in json.dumps(schema) and "zip" not in json.dumps(schema)
    with pytest.raises(ValidationError, match="segment"):
        shop.model_validate({"features": {"segment": "platinum"}})
    with pytest.raises(ValidationError, match="zip"):
        shop.model_validate({"features": {"zip": "55414"}})
    ml = model(load_movielens("ml-100k"))
    req = ml.model_validate({"features": {"age": 25, "gender": "F", "occupation": "student", "zip": "55414"}})
    assert user_record(req.features) == {
        "age_bucket": "25",
        "gender": "F",
        "occupation": "student",
        "zip_region": "5",
        "age": 25.0,
        "history": [],
    }


@pytest.fixture(scope="module")
def shop_run(tmp_path_factory) -> SimpleNamespace:
    """`make demo DATASET=<spec>` on a 200-user shop log, whose IDs are text and which has no
    titles: every stage trained (quick), and what the demo printed."""
    from integration.demo import main as demo

    tmp = tmp_path_factory.mktemp("shop-run")
    spec, cache, root = _shop(tmp / "shop", n_users=200), str(tmp / "cache"), tmp / "runs"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        res = demo(
            ["--dataset", str(spec), "--data-dir", cache, "--artifacts", str(root), "--quick", "--sequential", "none"]
            + ["--users", "cust-0007", "--n-boot", "10"]
        )
    return SimpleNamespace(cache=cache, root=root, trained=res["trained"], printed=printed.getvalue())


@pytest.mark.slow
def test_the_demo_and_the_service_on_a_log_with_text_ids(shop_run: SimpleNamespace) -> None:
    """The demo and the HTTP service on the shop log: the demo prints a user's list, and the API
    takes and returns the raw text IDs (recommend, a user's page, events, features with a history),
    refusing an integer user_id."""
    from integration.caches import MemoryCache
    from integration.loader import create_pipeline
    from integration.service import ABRouter, create_service
    from tests.conftest import ready_client

    assert len(shop_run.trained) == 3 and "user cust-0007:" in shop_run.printed
    pipeline = create_pipeline(shop_run.root, data_dir=shop_run.cache)
    app, batcher = create_service(pipeline, MemoryCache(ttl=60), ABRouter({"A": 1.0}))
    with ready_client(app, batcher) as c:
        rec = c.post("/recommend", json={"user_id": "cust-0007", "k": 5}).json()
        assert rec["user_id"] == "cust-0007" and rec["stage"] == "ranked" and len(rec["items"]) == 5
        assert all(x["item_id"].startswith("sku-") and x["title"] == x["item_id"] for x in rec["items"])
        view = c.get("/users/cust-0007").json()
        assert view["user_id"] == "cust-0007" and all(x["item_id"].startswith("sku-") for x in view["recent"])
        top = rec["items"][0]["item_id"]
        ev = c.post("/events", json={"user_id": "cust-0007", "item_id": top, "event_id": "e1"}).json()
        assert ev == {"user_id": "cust-0007", "history_length": view["history_length"] + 1, "duplicate": False}
        after = c.post("/recommend", json={"user_id": "cust-0007", "k": 5}).json()
        assert top not in [x["item_id"] for x in after["items"]]
        assert c.get("/users/random").json()["user_id"].startswith("cust-")
        assert c.post("/recommend", json={"user_id": "nobody", "k": 3}).json()["stage"] == "popular"
        new = c.post("/recommend", json={"features": {"segment": "gold", "history": ["sku-001"]}, "k": 5}).json()
        assert new["stage"] == "retrieval" and "sku-001" not in [x["item_id"] for x in new["items"]]
        assert c.get("/users/nobody").status_code == 404
        bad = c.post("/recommend", json={"user_id": 7})
        assert bad.status_code == 422 and "user_id" in json.dumps(bad.json())
        unknown = c.post("/events", json={"user_id": "cust-0007", "item_id": "sku-999"})
        assert unknown.status_code == 422 and "sku-999" in json.dumps(unknown.json())


@pytest.mark.browser
def test_the_web_page_follows_the_served_data_set(shop_run: SimpleNamespace) -> None:
    """The page at GET / on the shop log, in headless Chromium: a text user ID, the log's own user
    feature (segment, its values listed) in the new-user form instead of MovieLens's, items shown by
    raw ID and found by it where there are no titles, and an unknown user's message on the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from integration.loader import create_pipeline
    from tests.conftest import page_error_for_user, page_in_browser

    expected = create_pipeline(shop_run.root, data_dir=shop_run.cache).recommend(["cust-0007"])[0]
    with page_in_browser(["--artifacts", str(shop_run.root), "--data-dir", shop_run.cache]) as (browser, wait):
        assert browser.find_element(By.ID, "status").text.startswith("shop: ready")

        def shown(table: str) -> list[str]:
            rows = browser.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")
            return [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows]

        browser.find_element(By.ID, "user-id").send_keys("cust-0007")
        browser.find_element(By.ID, "recommend").click()
        wait.until(lambda _: len(shown("recommendations")) == 10)
        assert shown("recommendations") == expected.titles and expected.titles[0].startswith("sku-")
        assert all(li.text.startswith("sku-") for li in browser.find_elements(By.CSS_SELECTOR, "#recent li"))

        fields = browser.find_elements(By.CSS_SELECTOR, "#features [data-field]")
        assert [f.get_attribute("data-field") for f in fields] == ["segment"]
        segment = Select(fields[0])
        assert [o.text for o in segment.options] == ["(not given)", "basic", "gold", MISSING]  # the vocabulary
        segment.select_by_visible_text("gold")
        assert browser.find_element(By.ID, "search").get_attribute("placeholder") == "type an item ID"
        browser.find_element(By.ID, "search").send_keys("sku-01")
        results = browser.find_element(By.ID, "search-results")
        wait.until(lambda _: results.get_attribute("data-query") == "sku-01")
        found = results.find_elements(By.TAG_NAME, "li")
        assert len(found) == 8 and all(li.text.startswith("sku-01") for li in found)  # sku-010..019, 8 shown
        liked = found[0].text
        found[0].click()
        wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#liked .chip"))
        browser.find_element(By.ID, "recommend-new").click()
        wait.until(lambda _: len(shown("new-recommendations")) == 10)
        assert browser.find_element(By.ID, "new-stage").text == "retrieval"
        assert liked not in shown("new-recommendations")

        assert "nobody is not a known user of shop" in page_error_for_user(browser, wait, "nobody")
