"""Results store: every inspection as a row (SQLAlchemy: SQLite in WAL mode by
default, PostgreSQL by URL), images and overlays on disk by content hash.

The schema is created and upgraded by Alembic migrations
(``defectkit/serve/migrations``) when the store is opened. A result's files are
written (atomically) before its row, and the row is committed before
:meth:`ResultStore.add` returns, so a caller that answers after ``add`` never
reports a result that a crash could lose.

>>> store = ResultStore.open("sqlite:///results.db", "blobs")  # doctest: +SKIP
>>> row = store.add(record, image_bytes, overlay_png, line="L1")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    and_,
    case,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERDICTS = ("good", "defect")


def _filters(
    since: datetime | None,
    until: datetime | None,
    line: str | None,
    lot: str | None,
    product: str | None,
) -> list[Any]:
    conds: list[Any] = []
    if since is not None:
        conds.append(Result.created_at >= since)
    if until is not None:
        conds.append(Result.created_at < until)
    for col, value in ((Result.line, line), (Result.lot, lot), (Result.product, product)):
        if value is not None:
            conds.append(col == value)
    return conds


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Result(Base):
    """One inspected image (times are naive UTC)."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, index=True, default=utcnow)
    line: Mapped[str | None] = mapped_column(String(200), index=True)
    lot: Mapped[str | None] = mapped_column(String(200), index=True)
    part_id: Mapped[str | None] = mapped_column(String(200))
    product: Mapped[str | None] = mapped_column(String(200), index=True)
    filename: Mapped[str | None] = mapped_column(String(500))
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_ext: Mapped[str] = mapped_column(String(10))
    overlay_sha256: Mapped[str | None] = mapped_column(String(64))
    score: Mapped[float | None] = mapped_column(Float)
    is_defect: Mapped[bool | None] = mapped_column(Boolean, index=True)
    threshold: Mapped[float | None] = mapped_column(Float)
    severity: Mapped[str | None] = mapped_column(String(20))
    record: Mapped[dict[str, Any]] = mapped_column(JSON)
    review_verdict: Mapped[str | None] = mapped_column(String(10), index=True)
    review_defect_type: Mapped[str | None] = mapped_column(String(200))
    review_comment: Mapped[str | None] = mapped_column(Text)
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime)

    def to_dict(self) -> dict[str, Any]:
        """The inspect result object plus id, metadata, review and links."""
        out = dict(self.record)
        out.update(
            id=self.id,
            created_at=self.created_at.isoformat() + "Z",
            line=self.line,
            lot=self.lot,
            part_id=self.part_id,
            product=self.product,
            image_sha256=self.image_sha256,
            review=None
            if self.review_verdict is None
            else {
                "verdict": self.review_verdict,
                "defect_type": self.review_defect_type,
                "comment": self.review_comment,
                "reviewed_at": self.reviewed_at.isoformat() + "Z" if self.reviewed_at else None,
            },
            links={
                "self": f"/results/{self.id}",
                "overlay": f"/results/{self.id}/overlay.png",
                "image": f"/results/{self.id}/image",
            },
        )
        return out


class Alarm(Base):
    """An SPC rule that fired."""

    __tablename__ = "alarms"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, index=True, default=utcnow)
    chart: Mapped[str] = mapped_column(String(50))
    rule: Mapped[str] = mapped_column(String(100))
    message: Mapped[str] = mapped_column(Text)
    result_id: Mapped[int | None] = mapped_column(Integer)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at.isoformat() + "Z",
            "chart": self.chart,
            "rule": self.rule,
            "message": self.message,
            "result_id": self.result_id,
        }


class Outbox(Base):
    """A message for the MQTT broker (``serve/mqtt.py``), committed with the result
    or alarm it announces; ``sent_at`` is set once the broker acknowledged it."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    topic: Mapped[str] = mapped_column(String(500))
    payload: Mapped[str] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)


@dataclass(frozen=True)
class Topics:
    """Where results and alarms are announced (an MQTT topic each)."""

    results: str
    alarms: str


class BlobStore:
    """Files named by the SHA-256 of their bytes under ``root/ab/<hash>.<ext>``.

    Names come only from hashes and a fixed set of extensions, never from a
    request."""

    EXTS = ("png", "jpg", "bmp", "tif", "webp", "bin")

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str, ext: str) -> Path:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha) or ext not in self.EXTS:
            raise ValueError(f"bad blob name {sha!r}.{ext!r}")
        return self.root / sha[:2] / f"{sha}.{ext}"

    def put(self, data: bytes, ext: str) -> str:
        sha = hashlib.sha256(data).hexdigest()
        dest = self.path(sha, ext)
        if dest.exists():
            return sha
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha

    def get(self, sha: str, ext: str) -> bytes:
        return self.path(sha, ext).read_bytes()


def image_ext(data: bytes) -> str:
    """File extension for an image's bytes, from its magic number."""
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "bin"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get WAL mode and their folder is created."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            url = "postgresql+psycopg://" + url[len(plain) :]
    if url.startswith("sqlite"):
        db = url.split("///", 1)[-1] if "///" in url else ""
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@dataclass
class Page:
    items: list[Result]
    total: int


class ResultStore:
    """Rows in a database, files in a :class:`BlobStore`."""

    def __init__(self, engine: Engine, blobs: BlobStore) -> None:
        self.engine = engine
        self.blobs = blobs
        self._session = sessionmaker(engine, expire_on_commit=False)
        #: where each result and alarm is also announced (MQTT), through the outbox
        #: table in the same transaction; None: no messages
        self.topics: Topics | None = None

    @classmethod
    def open(cls, url: str, blob_dir: str | os.PathLike[str]) -> ResultStore:
        engine = make_engine(url)
        upgrade(engine)
        return cls(engine, BlobStore(blob_dir))

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        return self._session()

    # -- write --------------------------------------------------------------------
    def add(
        self,
        record: dict[str, Any],
        image: bytes,
        overlay_png: bytes | None,
        *,
        filename: str | None = None,
        line: str | None = None,
        lot: str | None = None,
        part_id: str | None = None,
        product: str | None = None,
        created_at: datetime | None = None,
    ) -> Result:
        """Store the files, then insert and commit the row; returns it (with ``id``).
        ``product`` defaults to the record's own (a multi-product model's answer)."""
        ext = image_ext(image)
        image_sha = self.blobs.put(image, ext)
        overlay_sha = self.blobs.put(overlay_png, "png") if overlay_png is not None else None
        # JSON round trip: numpy scalars and the like fail here, not in the database
        record = json.loads(json.dumps(record))
        row = Result(
            created_at=created_at or utcnow(),
            line=line,
            lot=lot,
            part_id=part_id,
            product=product if product is not None else record.get("product"),
            filename=filename,
            image_sha256=image_sha,
            image_ext=ext,
            overlay_sha256=overlay_sha,
            score=record.get("score"),
            is_defect=record.get("is_defect"),
            threshold=record.get("threshold"),
            severity=record.get("severity"),
            record=record,
        )
        with self.session() as s, s.begin():
            s.add(row)
            if self.topics is not None:
                s.flush()  # the id, for the message
                s.add(Outbox(topic=self.topics.results, payload=json.dumps(row.to_dict())))
        return row

    def review(
        self,
        result_id: int,
        verdict: str,
        defect_type: str | None = None,
        comment: str | None = None,
    ) -> Result | None:
        """Record an operator's verdict; None when there is no such result."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        with self.session() as s, s.begin():
            row = s.get(Result, result_id)
            if row is None:
                return None
            row.review_verdict = verdict
            row.review_defect_type = defect_type if verdict == "defect" else None
            row.review_comment = comment
            row.reviewed_at = utcnow()
        return row

    def add_alarm(self, chart: str, rule: str, message: str, result_id: int | None) -> Alarm:
        alarm = Alarm(chart=chart, rule=rule, message=message, result_id=result_id)
        with self.session() as s, s.begin():
            s.add(alarm)
            if self.topics is not None:
                s.flush()
                payload = json.dumps({"alarm": alarm.to_dict()})
                s.add(Outbox(topic=self.topics.alarms, payload=payload))
        return alarm

    def outbox_pending(self, limit: int = 100) -> list[Outbox]:
        """Messages not yet acknowledged by the broker, oldest first."""
        with self.session() as s:
            q = select(Outbox).where(Outbox.sent_at.is_(None)).order_by(Outbox.id).limit(limit)
            return list(s.scalars(q))

    def outbox_sent(self, ids: list[int]) -> None:
        """Mark messages acknowledged by the broker."""
        if not ids:
            return
        with self.session() as s, s.begin():
            for row in s.scalars(select(Outbox).where(Outbox.id.in_(ids))):
                row.sent_at = utcnow()

    # -- read ---------------------------------------------------------------------
    def find_image(self, sha256: str) -> Result | None:
        """The first result stored for the image with this content hash, or None."""
        with self.session() as s:
            return s.scalars(
                select(Result).where(Result.image_sha256 == sha256).order_by(Result.id).limit(1)
            ).first()

    def get(self, result_id: int) -> Result | None:
        with self.session() as s:
            return s.get(Result, result_id)

    def query(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        line: str | None = None,
        lot: str | None = None,
        product: str | None = None,
        verdict: str | None = None,
        reviewed: bool | None = None,
        limit: int = 50,
        offset: int = 0,
        newest_first: bool = True,
        order: str | None = None,
    ) -> Page:
        """Results filtered by time range ``[since, until)``, line, lot, product,
        verdict (``ok``/``ng``/``unknown``) and reviewed state; one page of them.

        ``order``: ``newest`` (default), ``oldest`` (also ``newest_first`` False) or
        ``doubt``: closest to its threshold first (``|score - threshold| /
        threshold``), the results a reviewer learns most from; results without a
        threshold come last."""
        conds = _filters(since, until, line, lot, product)
        if verdict == "ng":
            conds.append(Result.is_defect.is_(True))
        elif verdict == "ok":
            conds.append(Result.is_defect.is_(False))
        elif verdict == "unknown":
            conds.append(Result.is_defect.is_(None))
        elif verdict is not None:
            raise ValueError(f"verdict must be ok, ng or unknown, got {verdict!r}")
        if reviewed is True:
            conds.append(Result.review_verdict.is_not(None))
        elif reviewed is False:
            conds.append(Result.review_verdict.is_(None))
        order = order or ("newest" if newest_first else "oldest")
        if order == "newest":
            ordering = [Result.id.desc()]
        elif order == "oldest":
            ordering = [Result.id.asc()]
        elif order == "doubt":
            known = and_(
                Result.threshold.is_not(None), Result.threshold > 0, Result.score.is_not(None)
            )
            doubt = case(
                (known, func.abs(Result.score - Result.threshold) / Result.threshold), else_=None
            )
            ordering = [case((known, 0), else_=1), doubt.asc(), Result.id.desc()]
        else:
            raise ValueError(f"order must be newest, oldest or doubt, got {order!r}")
        with self.session() as s:
            total = s.scalar(select(func.count()).select_from(Result).where(*conds)) or 0
            items = list(
                s.scalars(
                    select(Result).where(*conds).order_by(*ordering).limit(limit).offset(offset)
                )
            )
        return Page(items, int(total))

    def summary(
        self,
        since: datetime,
        until: datetime | None = None,
        *,
        line: str | None = None,
        lot: str | None = None,
        product: str | None = None,
        top: int = 10,
    ) -> dict[str, Any]:
        """Counts for the dashboard's header over ``[since, until)``: parts, OK,
        NG, undecided, reviewed, alarms, and the same per line and per lot (the
        ``top`` busiest of each)."""
        conds = _filters(since, until, line, lot, product)
        ng = func.sum(case((Result.is_defect.is_(True), 1), else_=0))
        ok = func.sum(case((Result.is_defect.is_(False), 1), else_=0))
        with self.session() as s:
            n, n_ok, n_ng, reviewed, first, last = s.execute(
                select(
                    func.count(),
                    ok,
                    ng,
                    func.count(Result.review_verdict),
                    func.min(Result.created_at),
                    func.max(Result.created_at),
                ).where(*conds)
            ).one()
            alarm_conds = [Alarm.created_at >= since]
            if until is not None:
                alarm_conds.append(Alarm.created_at < until)
            alarms = s.scalar(select(func.count()).select_from(Alarm).where(*alarm_conds))
            groups = {}
            for name, col in (("by_line", Result.line), ("by_lot", Result.lot)):
                rows = s.execute(
                    select(col, func.count(), ok, ng)
                    .where(*conds)
                    .group_by(col)
                    .order_by(func.count().desc())
                    .limit(top)
                ).all()
                groups[name] = [
                    {"name": g, "n": int(c), "ok": int(o or 0), "ng": int(b or 0)}
                    for g, c, o, b in rows
                ]
        return {
            "n": int(n),
            "ok": int(n_ok or 0),
            "ng": int(n_ng or 0),
            "unknown": int(n) - int(n_ok or 0) - int(n_ng or 0),
            "reviewed": int(reviewed),
            "alarms": int(alarms or 0),
            "first": None if first is None else first.isoformat() + "Z",
            "last": None if last is None else last.isoformat() + "Z",
            **groups,
        }

    def facets(self, limit: int = 200) -> dict[str, list[str]]:
        """The lines, lots, products and reviewed defect types seen so far (for
        the dashboard's filters and review form; lots newest first)."""
        with self.session() as s:

            def distinct(col: Any, newest: bool = False) -> list[str]:
                q = select(col).where(col.is_not(None)).group_by(col)
                q = q.order_by(func.max(Result.id).desc() if newest else col).limit(limit)
                return [v for v in s.scalars(q) if v]

            return {
                "lines": distinct(Result.line),
                "lots": distinct(Result.lot, newest=True),
                "products": distinct(Result.product),
                "defect_types": distinct(Result.review_defect_type),
            }

    def count(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(Result)) or 0)

    def alarms(self, limit: int = 100) -> list[Alarm]:
        with self.session() as s:
            return list(s.scalars(select(Alarm).order_by(Alarm.id.desc()).limit(limit)))

    def reviewed(self) -> list[Result]:
        """Every reviewed result, oldest first."""
        with self.session() as s:
            q = select(Result).where(Result.review_verdict.is_not(None)).order_by(Result.id)
            return list(s.scalars(q))
