"""Command sources: chunked readers, row values, built-in mappings and their lookup."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aggregates.aircraft import Aircraft
from aggregates.customer import Customer
from aggregates.errors import InvalidCommandError
from aggregates.shop import Shop
from aggregates.workload import generate_commands
from pipeline.sources import (
    MAPPINGS,
    SourceMapping,
    default_retail_path,
    flight_command,
    iter_commands,
    iter_flight_rows,
    iter_records,
    iter_rows,
    resolve_mapping,
    retail_command,
    shop_command,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def numbers_frame(num_rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "number": range(num_rows),
            "name": [f"row-{row}" for row in range(num_rows)],
            "price": [row / 4 for row in range(num_rows)],
        }
    )


def test_csv_is_read_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    numbers_frame(10).to_csv(path, index=False)

    chunks = list(iter_rows(path, chunk_rows=3))

    assert [len(chunk) for chunk in chunks] == [3, 3, 3, 1]
    assert pd.concat(chunks)["number"].tolist() == list(range(10))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".ndjson"])
def test_json_lines_are_read_in_chunks(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"rows{suffix}"
    numbers_frame(7).to_json(path, orient="records", lines=True)

    chunks = list(iter_rows(path, chunk_rows=2))

    assert [len(chunk) for chunk in chunks] == [2, 2, 2, 1]
    assert pd.concat(chunks)["name"].tolist() == [f"row-{row}" for row in range(7)]


def test_parquet_is_read_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pandas(numbers_frame(10)), path, row_group_size=5)

    chunks = list(iter_rows(path, chunk_rows=4))

    assert max(len(chunk) for chunk in chunks) <= 4
    assert pd.concat(chunks)["price"].tolist() == [row / 4 for row in range(10)]


def test_unknown_suffix_names_path_and_suffixes(tmp_path: Path) -> None:
    path = tmp_path / "rows.xlsx"
    path.write_text("")

    with pytest.raises(ValueError, match="unknown file suffix") as caught:
        list(iter_rows(path))

    assert str(path) in str(caught.value)
    assert ".parquet, .csv, .jsonl, .json, .ndjson" in str(caught.value)


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        list(iter_rows(tmp_path / "missing.csv"))


def test_chunk_rows_below_one_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    numbers_frame(1).to_csv(path, index=False)

    with pytest.raises(ValueError, match="chunk_rows must be at least 1, got 0"):
        list(iter_rows(path, chunk_rows=0))


def test_records_convert_to_json_values() -> None:
    frame = pd.DataFrame(
        {
            "count": np.array([1, 2], dtype="int64"),
            "gap": [1.5, np.nan],
            "when": pd.to_datetime(["2011-12-09 12:50:00", None]),
            "precise": [
                pd.Timestamp("2011-12-09 12:50:00.25"),
                pd.Timestamp("2011-12-09"),
            ],
            "zoned": pd.to_datetime(["2013-01-01 10:00", None]).tz_localize("UTC"),
            "nullable": pd.array([3, None], dtype="Int64"),
            "text": pd.array(["a", None], dtype="string"),
            "mixed": pd.Series([np.int32(4), float("nan")], dtype=object),
            "flag": [True, False],
        }
    )

    records = list(iter_records(frame))

    assert records == [
        {
            "count": 1,
            "gap": 1.5,
            "when": "2011-12-09T12:50:00",
            "precise": "2011-12-09T12:50:00.250000",
            "zoned": "2013-01-01T10:00:00+00:00",
            "nullable": 3,
            "text": "a",
            "mixed": 4,
            "flag": True,
        },
        {
            "count": 2,
            "gap": None,
            "when": None,
            "precise": "2011-12-09T00:00:00.000000",
            "zoned": None,
            "nullable": None,
            "text": None,
            "mixed": None,
            "flag": False,
        },
    ]
    assert type(records[0]["count"]) is int
    assert type(records[0]["mixed"]) is int


def test_shop_json_lines_round_trip(tmp_path: Path) -> None:
    """Workload commands read back equal, though some lack keys others have."""
    commands = list(
        generate_commands(num_shops=5, num_commands=40, seed=7, note_bytes=16)
    )
    path = tmp_path / "shop.jsonl"
    path.write_text("".join(json.dumps(command) + "\n" for command in commands))

    messages = list(iter_commands(path, "shop", chunk_rows=8))

    assert messages == commands
    for message in messages:
        Shop.command_from_message(message)


def test_shop_rows_without_id_get_row_number() -> None:
    frame = pd.DataFrame(
        [{"type": "FulfillOrder", "shop_id": "s", "order_id": "o"}] * 2
    )

    messages = list(iter_commands(frame, "shop"))

    assert [message["command_id"] for message in messages] == ["shop-0", "shop-1"]


def test_iter_commands_stops_at_limit() -> None:
    messages = list(iter_commands(None, "flights", limit=5, chunk_rows=2))

    assert [message["command_id"] for message in messages] == [
        f"flights-{row}" for row in range(5)
    ]


def test_iter_commands_limit_zero_yields_nothing() -> None:
    assert list(iter_commands(None, "flights", limit=0)) == []


def test_iter_commands_rejects_negative_limit() -> None:
    with pytest.raises(ValueError, match="limit must be at least 0"):
        list(iter_commands(None, "flights", limit=-1))


def test_mapping_without_source_needs_path() -> None:
    with pytest.raises(
        ValueError, match="mapping 'shop' has no source of its own, so pass a file path"
    ):
        list(iter_commands(None, "shop"))


def test_flight_rows_come_in_schedule_order() -> None:
    chunks = list(iter_flight_rows(chunk_rows=100_000))
    rows = pd.concat(chunks)
    keys = list(zip(rows["time_hour"], rows["sched_dep_time"], strict=True))

    assert [len(chunk) for chunk in chunks] == [100_000, 100_000, 100_000, 36_776]
    assert rows.index.is_unique
    assert len(rows) == 336_776
    assert keys == sorted(keys)


def test_flight_rows_keep_data_order_on_ties() -> None:
    rows = pd.concat(iter_flight_rows(limit=2_000))
    ties = rows.groupby(["time_hour", "sched_dep_time"], sort=False)

    assert all(group.index.is_monotonic_increasing for _, group in ties)


def test_flight_commands_are_json() -> None:
    messages = list(iter_commands(None, "flights", limit=20_000))

    text = json.dumps(messages, allow_nan=False)

    assert len(json.loads(text)) == 20_000


FLIGHT_ROW = {
    "year": 2013,
    "month": 1,
    "day": 1,
    "dep_time": 517.0,
    "sched_dep_time": 515,
    "dep_delay": 2.0,
    "arr_time": 830.0,
    "sched_arr_time": 819,
    "arr_delay": 11.0,
    "carrier": "UA",
    "flight": 1545,
    "tailnum": "N14228",
    "origin": "EWR",
    "dest": "IAH",
    "air_time": 227.0,
    "distance": 1400,
    "hour": 5,
    "minute": 15,
    "time_hour": "2013-01-01T10:00:00Z",
}


def test_flight_row_becomes_record_flight() -> None:
    message = flight_command(FLIGHT_ROW, 0)

    assert message == {
        "type": "RecordFlight",
        "tailnum": "N14228",
        "command_id": "flights-0",
        "carrier": "UA",
        "flight_number": 1545,
        "origin": "EWR",
        "dest": "IAH",
        "scheduled_departure": "2013-01-01T10:15:00+00:00",
        "dep_delay_min": 2,
        "arr_delay_min": 11,
        "air_time_min": 227,
        "distance_miles": 1400,
    }
    assert type(message["dep_delay_min"]) is int
    Aircraft.command_from_message(message)


def test_flight_without_dep_time_is_cancellation() -> None:
    row = {**FLIGHT_ROW, "dep_time": None, "dep_delay": None, "arr_delay": None}

    message = flight_command(row, 3)

    assert message["type"] == "RecordCancellation"
    assert "dep_delay_min" not in message
    Aircraft.command_from_message(message)


@pytest.mark.parametrize(
    ("changes", "field_name"),
    [
        ({"tailnum": None}, "tailnum"),
        ({"dep_delay": "late"}, "payload.dep_delay_min"),
        ({"distance": None}, "payload.distance_miles"),
        ({"time_hour": None}, "payload.scheduled_departure"),
        ({"minute": "quarter"}, "payload.scheduled_departure"),
        ({"time_hour": "1 Jan 2013"}, "payload.scheduled_departure"),
    ],
)
def test_bad_flight_row_becomes_dead_letter(
    changes: dict[str, Any], field_name: str
) -> None:
    message = flight_command({**FLIGHT_ROW, **changes}, 0)

    with pytest.raises(InvalidCommandError) as caught:
        Aircraft.command_from_message(message)

    assert caught.value.field == field_name


RETAIL_ROW = {
    "InvoiceNo": "536365",
    "StockCode": "85123A",
    "Description": "WHITE HANGING HEART T-LIGHT HOLDER",
    "Quantity": 6,
    "InvoiceDate": "2010-12-01T08:26:00",
    "UnitPrice": 2.55,
    "CustomerID": 17850.0,
    "Country": "United Kingdom",
}


def test_retail_row_becomes_invoice_line() -> None:
    message = retail_command(RETAIL_ROW, 12)

    assert message == {
        "type": "RecordInvoiceLine",
        "customer_id": "17850",
        "command_id": "retail-12",
        "invoice_no": "536365",
        "stock_code": "85123A",
        "description": "WHITE HANGING HEART T-LIGHT HOLDER",
        "quantity": 6,
        "unit_price": 2.55,
        "invoice_date": "2010-12-01T08:26:00",
        "country": "United Kingdom",
        "line_number": 12,
    }
    Customer.command_from_message(message)


def test_retail_csv_numbers_become_text(tmp_path: Path) -> None:
    """A CSV reader parses invoice numbers and stock codes as integers."""
    path = tmp_path / "retail.csv"
    pd.DataFrame([RETAIL_ROW, {**RETAIL_ROW, "StockCode": "22423"}]).to_csv(
        path, index=False
    )

    messages = list(iter_commands(path, "retail"))

    assert [message["stock_code"] for message in messages] == ["85123A", "22423"]
    assert [message["invoice_no"] for message in messages] == ["536365", "536365"]
    for message in messages:
        Customer.command_from_message(message)


def test_retail_guest_line_has_no_customer() -> None:
    message = retail_command({**RETAIL_ROW, "CustomerID": None}, 0)

    with pytest.raises(InvalidCommandError, match="customer_id is missing"):
        Customer.command_from_message(message)


def test_every_messy_row_becomes_a_message(tmp_path: Path) -> None:
    """Rows with missing and garbled values still yield one dict each, in order."""
    path = tmp_path / "messy.csv"
    path.write_text(
        "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
        "536365,85123A,HEART,6,2010-12-01 08:26:00,2.55,17850,United Kingdom\n"
        ",,,,,,,\n"
        "536366,22633,HAND WARMER,six,2010-12-01 08:28:00,1.85,17850,France\n"
        "C536379,D,Discount,-1,2010-12-01 09:41:00,27.50,14527,United Kingdom\n"
        "536367,84879,BIRD,32,2010-12-01 08:34:00,1.69,13047.5,United Kingdom\n"
    )

    messages = list(iter_commands(path, "retail", chunk_rows=2))
    outcomes = []
    for message in messages:
        try:
            Customer.command_from_message(message)
        except InvalidCommandError as err:
            outcomes.append(err.field)
        else:
            outcomes.append("valid")

    assert [message["line_number"] for message in messages] == [0, 1, 2, 3, 4]
    assert outcomes == [
        "valid",
        "customer_id",
        "payload.quantity",
        "valid",
        "customer_id",
    ]
    assert messages[3]["quantity"] == -1


def test_resolve_builtin_names() -> None:
    assert set(MAPPINGS) == {"flights", "retail", "shop"}
    assert resolve_mapping("flights").aggregate is Aircraft
    assert resolve_mapping("retail").aggregate is Customer
    assert resolve_mapping("shop").aggregate is Shop


def test_resolve_returns_mapping_unchanged() -> None:
    mapping = SourceMapping("custom", Shop, shop_command)

    assert resolve_mapping(mapping) is mapping


def test_resolve_import_path_to_function() -> None:
    mapping = resolve_mapping("pipeline.sources:retail_command")

    assert mapping.name == "retail_command"
    assert mapping.row is retail_command
    assert mapping.aggregate is None


def test_resolve_import_path_to_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "custom_rows.py").write_text(
        "from aggregates.shop import Shop\n"
        "from pipeline.sources import SourceMapping\n"
        "def orders(row, row_number):\n"
        "    return {'type': 'CancelOrder', 'shop_id': row['shop'],\n"
        "            'order_id': row['order']}\n"
        "MAPPING = SourceMapping('orders', Shop, orders)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    frame = pd.DataFrame({"shop": ["s-1"], "order": ["o-1"]})

    mapping = resolve_mapping("custom_rows:MAPPING")
    messages = list(iter_commands(frame, "custom_rows:MAPPING"))

    assert mapping.name == "orders"
    assert messages == [
        {
            "type": "CancelOrder",
            "shop_id": "s-1",
            "order_id": "o-1",
            "command_id": "orders-0",
        }
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "flight",
            "unknown mapping 'flight'; accepted: flights, retail, shop, or an import",
        ),
        ("", "unknown mapping ''"),
        ("pipeline.sources:", "unknown mapping 'pipeline.sources:'"),
        ("no_such_module_here:rows", "cannot import module 'no_such_module_here'"),
        ("pipeline.sources:no_such_rows", "has no attribute 'no_such_rows'"),
        ("pipeline.sources:MAPPINGS", "is a dict, not a SourceMapping or a function"),
    ],
)
def test_resolve_errors_name_value(value: str, expected: str) -> None:
    with pytest.raises(ValueError) as caught:
        resolve_mapping(value)

    assert expected in str(caught.value)


def test_retail_path_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYSOURCE_RETAIL_PARQUET", "/data/retail.parquet")

    assert default_retail_path() == Path("/data/retail.parquet")


def test_retail_path_beside_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAYSOURCE_RETAIL_PARQUET", raising=False)

    expected = REPO_ROOT.parent / "shared" / "data" / "online_retail_2010_2011.parquet"
    assert default_retail_path() == expected


def test_retail_file_read_in_chunks() -> None:
    path = default_retail_path()
    if not path.is_file():
        pytest.skip(
            f"Online Retail Parquet file not found at {path}; set "
            "RAYSOURCE_RETAIL_PARQUET to its path"
        )

    sizes = [len(chunk) for chunk in iter_rows(path, chunk_rows=100_000)]
    first = next(iter_commands(path, "retail", limit=1))

    assert max(sizes) <= 100_000
    assert sum(sizes) == 541_909
    assert first["invoice_date"] == "2010-12-01T08:26:00"
    assert first["customer_id"] == "17850"
    assert not any(
        isinstance(value, float) and math.isnan(value) for value in first.values()
    )
