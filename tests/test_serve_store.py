"""Results store: migrations, commit, filters, reviews, blobs by content hash;
on SQLite always, on PostgreSQL when DEFECTKIT_TEST_PG_URL is set (.ci/run sets it)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import create_engine, inspect, text

from defectkit.serve.store import BlobStore, ResultStore

PNG = b"\x89PNG\r\n\x1a\n" + b"fake image bytes"
JPG = b"\xff\xd8\xff\xe0" + b"other bytes"


def _pg_url() -> str:
    url = os.environ.get("DEFECTKIT_TEST_PG_URL")
    if not url:
        pytest.skip("DEFECTKIT_TEST_PG_URL not set: no PostgreSQL server (.ci/run starts one)")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'results.db'}"
        s = ResultStore.open(url, tmp_path / "blobs")
        yield s
        s.close()
        return
    base = _pg_url()
    # a fresh schema per test keeps tests independent on one server
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in base else "?"
    s = ResultStore.open(f"{base}{sep}options=-csearch_path%3D{schema}", tmp_path / "blobs")
    yield s
    s.close()
    with admin.begin() as c:
        c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def _rec(score: float, is_defect: bool | None) -> dict:
    return {"path": "a.png", "score": score, "is_defect": is_defect, "threshold": 1.0,
            "error": None, "regions": [], "severity": None}  # fmt: skip


def test_migrations_create_schema_and_alembic_version(store):
    tables = set(inspect(store.engine).get_table_names())
    assert {"results", "alarms", "alembic_version"} <= tables
    with store.engine.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0004"


def test_add_commits_before_return_and_is_visible_to_a_new_connection(store):
    row = store.add(_rec(0.5, False), PNG, PNG, filename="a.png", line="L1", lot="7")
    assert row.id >= 1
    # a second, independent engine sees the row: it was committed
    other = create_engine(store.engine.url)
    with other.connect() as c:
        n = c.execute(text("SELECT count(*) FROM results WHERE id = :i"), {"i": row.id}).scalar()
    other.dispose()
    assert n == 1
    got = store.get(row.id).to_dict()
    assert got["score"] == 0.5 and got["line"] == "L1" and got["lot"] == "7"
    assert got["links"]["overlay"] == f"/results/{row.id}/overlay.png"


def test_blobs_by_content_hash_are_deduplicated(store):
    a = store.add(_rec(0.1, False), PNG, PNG)
    b = store.add(_rec(0.2, False), PNG, PNG)
    sha = hashlib.sha256(PNG).hexdigest()
    assert a.image_sha256 == b.image_sha256 == sha
    path = store.blobs.path(sha, "png")
    assert path.read_bytes() == PNG
    assert path.parent.name == sha[:2]
    assert len(list(store.blobs.root.rglob("*.png"))) == 1
    c = store.add(_rec(0.3, False), JPG, None)
    assert c.image_ext == "jpg" and store.blobs.get(c.image_sha256, "jpg") == JPG


def test_blob_names_come_only_from_hashes(tmp_path):
    blobs = BlobStore(tmp_path)
    for bad in ("../../etc/passwd", "a" * 63, "g" * 64):
        with pytest.raises(ValueError):
            blobs.path(bad, "png")
    with pytest.raises(ValueError):
        blobs.path("a" * 64, "../x")


def test_query_filters_and_pagination(store):
    t0 = datetime(2026, 1, 1, 8, 0)
    for i in range(10):
        store.add(
            _rec(float(i), i % 3 == 0),
            PNG + bytes([i]),
            None,
            line="L1" if i < 6 else "L2",
            created_at=t0 + timedelta(minutes=i),
        )
    assert store.query().total == 10
    assert store.query(line="L2").total == 4
    ng = store.query(verdict="ng")
    assert ng.total == 4 and all(r.is_defect for r in ng.items)
    assert store.query(verdict="ok").total == 6
    window = store.query(since=t0 + timedelta(minutes=2), until=t0 + timedelta(minutes=5))
    assert [r.score for r in window.items] == [4.0, 3.0, 2.0]  # newest first
    p1 = store.query(limit=3, offset=0)
    p2 = store.query(limit=3, offset=3)
    assert p1.total == 10 and len(p1.items) == 3
    assert not {r.id for r in p1.items} & {r.id for r in p2.items}
    with pytest.raises(ValueError):
        store.query(verdict="maybe")


def test_review_and_reviewed_list(store):
    a = store.add(_rec(0.1, False), PNG, None)
    b = store.add(_rec(5.0, True), JPG, None)
    assert store.review(b.id, "defect", "scratch", "deep") is not None
    assert store.review(a.id, "good", "ignored for good parts") is not None
    assert store.review(999_999, "good") is None
    with pytest.raises(ValueError):
        store.review(a.id, "maybe")
    rows = store.reviewed()
    assert [(r.id, r.review_verdict, r.review_defect_type) for r in rows] == [
        (a.id, "good", None),
        (b.id, "defect", "scratch"),
    ]
    assert store.query(reviewed=False).total == 0
    assert store.get(b.id).to_dict()["review"]["comment"] == "deep"


def test_alarms_are_stored(store):
    store.add_alarm("ewma", "beyond limit", "drift", None)
    assert [a.chart for a in store.alarms()] == ["ewma"]


def test_sqlite_uses_wal_and_reopens_with_same_data(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    s = ResultStore.open(url, tmp_path / "blobs")
    s.add(_rec(1.0, False), PNG, None)
    s.close()
    mode = sqlite3.connect(tmp_path / "r.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    s2 = ResultStore.open(url, tmp_path / "blobs")  # migrations are idempotent
    assert s2.count() == 1
    s2.close()


def test_migrations_match_the_models(store):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from defectkit.serve.store import Base

    with store.engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), Base.metadata)
    assert diff == [], f"models and migrations differ (add a migration): {diff}"


def test_a_store_from_before_products_is_upgraded_with_its_rows(tmp_path):
    from alembic import command
    from alembic.config import Config

    from defectkit.serve.store import MIGRATIONS, make_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
        conn.execute(
            text(
                "INSERT INTO results (created_at, image_sha256, image_ext, record) "
                "VALUES ('2026-01-01 00:00:00', 'abc', 'png', '{\"score\": 1.0}')"
            )
        )
    engine.dispose()
    s = ResultStore.open(url, tmp_path / "blobs")
    try:
        assert s.count() == 1 and s.get(1).product is None
        s.add(_rec(0.5, False), PNG, None, product="pump-A")
        assert [r.id for r in s.query(product="pump-A").items] == [2]
    finally:
        s.close()


def test_product_comes_from_the_record_unless_given(store):
    a = store.add({**_rec(0.5, False), "product": "side-A"}, PNG, None)
    b = store.add({**_rec(0.5, False), "product": "side-A"}, PNG, None, product="side-B")
    assert (a.product, b.product) == ("side-A", "side-B")
    assert a.to_dict()["product"] == "side-A"
    assert store.facets()["products"] == ["side-A", "side-B"]


def test_doubt_order_puts_results_closest_to_their_threshold_first(store):
    # threshold 1.0: relative distances 0.9, 0.05, 0.3, 0.02 (and one without a threshold)
    for score in (0.1, 1.05, 1.3, 0.98):
        store.add(_rec(score, score >= 1.0), PNG, None)
    store.add({**_rec(2.0, None), "threshold": None}, PNG, None)
    page = store.query(order="doubt")
    assert [r.score for r in page.items] == [0.98, 1.05, 1.3, 0.1, 2.0]
    assert page.total == 5
    with pytest.raises(ValueError, match="order must be"):
        store.query(order="random")


def test_summary_counts_by_verdict_line_lot_and_window(store):
    now = datetime(2026, 5, 1, 12, 0, 0)
    rows = [  # (minutes ago, line, lot, is_defect)
        (5, "L1", "A", False), (10, "L1", "A", True), (20, "L2", "B", False),
        (30, "L2", "B", None), (120, "L1", "A", True),
    ]  # fmt: skip
    for ago, line, lot, is_defect in rows:
        store.add(
            _rec(1.0, is_defect), PNG, None, line=line, lot=lot,
            created_at=now - timedelta(minutes=ago),
        )  # fmt: skip
    store.review(2, "defect", "scratch")
    hour = store.summary(now - timedelta(hours=1), now)
    assert (hour["n"], hour["ok"], hour["ng"], hour["unknown"]) == (4, 2, 1, 1)
    assert hour["reviewed"] == 1
    lines = {g["name"]: (g["n"], g["ok"], g["ng"]) for g in hour["by_line"]}
    assert lines == {"L1": (2, 1, 1), "L2": (2, 1, 0)}
    assert {g["name"]: g["n"] for g in hour["by_lot"]} == {"A": 2, "B": 2}
    assert store.summary(now - timedelta(hours=3), now, line="L1")["ng"] == 2
    assert store.summary(now - timedelta(hours=3), now, lot="B")["n"] == 2
    assert store.summary(now - timedelta(minutes=1), now)["n"] == 0
    facets = store.facets()
    assert facets["lines"] == ["L1", "L2"] and facets["defect_types"] == ["scratch"]
