"""The Customer aggregate: decisions on invoice lines, and a fold of Online Retail.

The data test folds every line of the UCI Online Retail file (Chen, Sain and
Guo, 2012, licensed CC BY 4.0) and checks the result against pandas
computations on the same lines. It is skipped when the file is not where
default_retail_path() looks.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pytest

from aggregates.customer import Customer, is_goods
from aggregates.errors import DomainError, InvalidCommandError
from aggregates.fold import FoldResult, fold_commands
from pipeline.sources import default_retail_path, iter_commands

CUSTOMER_ID = "17850"


class Lines:
    """A factory of invoice lines of one customer, numbered 0, 1, 2, ..."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(
        self,
        invoice_no: str = "536365",
        stock_code: str = "85123A",
        quantity: int = 6,
        unit_price: float = 2.55,
        **fields: Any,
    ) -> dict[str, Any]:
        message = {
            "type": "RecordInvoiceLine",
            "customer_id": CUSTOMER_ID,
            "command_id": f"retail-{self.count}",
            "invoice_no": invoice_no,
            "stock_code": stock_code,
            "description": "WHITE HANGING HEART T-LIGHT HOLDER",
            "quantity": quantity,
            "unit_price": unit_price,
            "invoice_date": "2010-12-01T08:26:00",
            "country": "United Kingdom",
            "line_number": self.count,
        }
        message.update(fields)
        self.count += 1
        return message


@pytest.fixture
def line() -> Lines:
    return Lines()


def fold_messages(messages: Iterable[dict[str, Any]]) -> FoldResult:
    commands = [Customer.command_from_message(message) for message in messages]
    return fold_commands(Customer, commands)


def test_purchase_updates_totals(line: Lines) -> None:
    result = fold_messages(
        [
            line("536365", "85123A", 6, 2.55),
            line("536365", "71053", 6, 3.39),
            line("536366", "22633", 6, 1.85, invoice_date="2010-12-01 08:28:00"),
        ]
    )

    customer = result.aggregates[CUSTOMER_ID]
    assert [event.type for event in result.events[CUSTOMER_ID]] == ["ItemPurchased"] * 3
    assert customer.lines == 3
    assert customer.invoices == 2
    assert customer.lines_by_invoice == {"536365": 2, "536366": 1}
    assert customer.quantity_purchased == 18
    assert customer.spend_pence == 1530 + 2034 + 1110
    assert customer.countries == ["United Kingdom"]
    assert customer.first_invoice_at == "2010-12-01T08:26:00"
    assert customer.last_invoice_at == "2010-12-01T08:28:00"
    assert customer.net_quantity_by_stock_code == {"85123A": 6, "71053": 6, "22633": 6}


def test_return_of_bought_goods_is_recorded(line: Lines) -> None:
    result = fold_messages(
        [line("536365", "22423", 12, 10.95), line("C536379", "22423", -12, 10.95)]
    )

    customer = result.aggregates[CUSTOMER_ID]
    assert [event.type for event in result.events[CUSTOMER_ID]] == [
        "ItemPurchased",
        "ItemReturned",
    ]
    assert customer.quantity_purchased == 12
    assert customer.quantity_returned == 12
    assert customer.spend_pence == 0
    assert customer.net_quantity_by_stock_code == {}


def test_return_beyond_bought_is_rejected(line: Lines) -> None:
    result = fold_messages(
        [line("536365", "22423", 2, 10.95), line("C536379", "22423", -3, 10.95)]
    )

    assert result.rejected == {
        "retail-1": "line 1 (invoice C536379, stock code 22423) returns 3 units, "
        f"but customer {CUSTOMER_ID} has bought 2 units of that stock code and "
        "not returned them"
    }
    assert result.aggregates[CUSTOMER_ID].quantity_returned == 0


def test_credit_without_purchase_is_recorded(line: Lines) -> None:
    result = fold_messages([line("C536379", "D", -1, 27.5, description="Discount")])

    customer = result.aggregates[CUSTOMER_ID]
    assert result.rejected == {}
    assert customer.spend_pence == -2750
    assert customer.quantity_returned == 1


@pytest.mark.parametrize(
    ("invoice_no", "quantity", "unit_price", "reason"),
    [
        ("536365", 6, 0.0, "has unit price 0.0, which is not positive"),
        ("536365", 6, -1.5, "has unit price -1.5, which is not positive"),
        ("536365", -6, 2.55, "sales invoice needs a positive quantity"),
        ("536365", 0, 2.55, "sales invoice needs a positive quantity"),
        ("C536379", 6, 2.55, "cancellation invoice needs a negative quantity"),
        ("A563185", 1, 11062.06, "is a bad-debt adjustment"),
    ],
)
def test_line_against_rules_is_rejected(
    line: Lines, invoice_no: str, quantity: int, unit_price: float, reason: str
) -> None:
    result = fold_messages([line(invoice_no, "85123A", quantity, unit_price)])

    assert reason in result.rejected["retail-0"]
    assert result.events == {}


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"customer_id": None}, "customer_id"),
        ({"customer_id": "17850.0"}, "customer_id"),
        ({"quantity": "6"}, "payload.quantity"),
        ({"quantity": 6.5}, "payload.quantity"),
        ({"unit_price": "2.55"}, "payload.unit_price"),
        ({"unit_price": float("inf")}, "payload.unit_price"),
        ({"invoice_no": "X536365"}, "payload.invoice_no"),
        ({"invoice_no": None}, "payload.invoice_no"),
        ({"invoice_date": "01/12/2010 08:26"}, "payload.invoice_date"),
        ({"invoice_date": "2010-12-01T08:26:00+00:00"}, "payload.invoice_date"),
        ({"country": None}, "payload.country"),
        ({"line_number": -1}, "payload.line_number"),
    ],
)
def test_invalid_line_names_field(
    line: Lines, fields: dict[str, Any], field_name: str
) -> None:
    with pytest.raises(InvalidCommandError) as caught:
        Customer.command_from_message(line(**fields))

    assert caught.value.field == field_name


def test_execute_raises_domain_error(line: Lines) -> None:
    customer = Customer(CUSTOMER_ID)
    command = Customer.command_from_message(line(unit_price=0.0))

    with pytest.raises(DomainError, match="which is not positive"):
        customer.execute(command)


def test_second_country_is_listed(line: Lines) -> None:
    result = fold_messages([line(country="United Kingdom"), line(country="EIRE")])

    assert result.aggregates[CUSTOMER_ID].countries == ["EIRE", "United Kingdom"]


def test_snapshot_round_trip_keeps_state(line: Lines) -> None:
    result = fold_messages([line(), line("C536379", "85123A", -2, 2.55)])
    customer = result.aggregates[CUSTOMER_ID]

    state = json.loads(json.dumps(customer.snapshot_state()))
    restored = Customer.from_snapshot(CUSTOMER_ID, customer.version, state)

    assert restored.snapshot_state() == customer.snapshot_state()
    assert restored.net_quantity_by_stock_code == {"85123A": 4}


@pytest.mark.parametrize(
    ("stock_code", "expected"),
    [
        ("85123A", True),
        ("22423", True),
        ("POST", False),
        ("D", False),
        ("M", False),
        ("BANK CHARGES", False),
        ("DCGS0003", False),
        ("gift_0001_10", False),
    ],
)
def test_is_goods_by_stock_code(stock_code: str, expected: bool) -> None:
    assert is_goods(stock_code) is expected


@dataclass
class RetailFold:
    """The file's lines in row order, and what became of each line's command."""

    rows: pd.DataFrame
    result: FoldResult
    dead_letters: dict[str, str]


@pytest.fixture(scope="module")
def retail_fold() -> RetailFold:
    """Fold all 541,909 lines once for the data tests (about 13 s)."""
    path = default_retail_path()
    if not path.is_file():
        pytest.skip(
            f"Online Retail Parquet file not found at {path}; set "
            "RAYSOURCE_RETAIL_PARQUET to its path"
        )

    dead_letters: dict[str, str] = {}
    commands = []
    for message in iter_commands(path, "retail"):
        try:
            commands.append(Customer.command_from_message(message))
        except InvalidCommandError as err:
            dead_letters[message["command_id"]] = str(err)
    rows = pd.read_parquet(path)
    rows["command_id"] = [f"retail-{position}" for position in range(len(rows))]
    return RetailFold(rows, fold_commands(Customer, commands), dead_letters)


def expected_rejections(rows: pd.DataFrame) -> set[str]:
    """Apply the Customer rules to the file with plain Python, as an oracle.

    Zero prices are rejected. A return of goods is rejected when it exceeds
    what the customer has bought and not returned. The file has no line that
    another rule rejects.
    """
    rejected = set()
    net_quantity: dict[tuple[float, str], int] = defaultdict(int)
    lines = rows[rows["CustomerID"].notna()]
    for command_id, customer, stock_code, quantity, unit_price in zip(
        lines["command_id"],
        lines["CustomerID"],
        lines["StockCode"],
        lines["Quantity"],
        lines["UnitPrice"],
        strict=True,
    ):
        key = (customer, stock_code)
        if unit_price <= 0:
            rejected.add(command_id)
        elif quantity < 0 and is_goods(stock_code) and net_quantity[key] + quantity < 0:
            rejected.add(command_id)
        else:
            net_quantity[key] += quantity
    return rejected


def test_retail_every_line_accounted(retail_fold: RetailFold) -> None:
    result = retail_fold.result
    event_ids = [
        event.metadata.command_id
        for events in result.events.values()
        for event in events
    ]
    outcomes = [*event_ids, *result.rejected, *retail_fold.dead_letters]

    assert len(retail_fold.rows) == 541_909
    assert len(outcomes) == len(retail_fold.rows)
    assert set(outcomes) == set(retail_fold.rows["command_id"])


def test_retail_guest_lines_are_dead_letters(retail_fold: RetailFold) -> None:
    rows = retail_fold.rows
    guest_ids = set(rows.loc[rows["CustomerID"].isna(), "command_id"])

    assert set(retail_fold.dead_letters) == guest_ids
    assert len(guest_ids) == 135_080
    assert set(retail_fold.dead_letters.values()) == {"customer_id is missing"}


def test_retail_rejections_follow_rules(retail_fold: RetailFold) -> None:
    rows = retail_fold.rows
    rejected = retail_fold.result.rejected
    zero_price = rows[rows["CustomerID"].notna() & (rows["UnitPrice"] <= 0)]

    assert set(rejected) == expected_rejections(rows)
    assert len(zero_price) == 40
    for command_id in zero_price["command_id"]:
        assert rejected[command_id].endswith(
            "has unit price 0.0, which is not positive"
        )
    assert len(rejected) - len(zero_price) == 1_105


def test_retail_totals_match_pandas(retail_fold: RetailFold) -> None:
    rows = retail_fold.rows
    result = retail_fold.result
    event_ids = {
        event.metadata.command_id
        for events in result.events.values()
        for event in events
    }
    lines = rows[rows["command_id"].isin(event_ids)]
    lines = lines.assign(
        customer_id=lines["CustomerID"].astype("int64").astype(str),
        purchased=lines["Quantity"].clip(lower=0),
        returned=(-lines["Quantity"]).clip(lower=0),
        amount_pence=(lines["Quantity"] * lines["UnitPrice"] * 100)
        .round()
        .astype("int64"),
        invoice_at=lines["InvoiceDate"].dt.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    expected = lines.groupby("customer_id").agg(
        lines=("command_id", "size"),
        invoices=("InvoiceNo", "nunique"),
        quantity_purchased=("purchased", "sum"),
        quantity_returned=("returned", "sum"),
        spend_pence=("amount_pence", "sum"),
        first_invoice_at=("invoice_at", "min"),
        last_invoice_at=("invoice_at", "max"),
        countries=("Country", lambda countries: sorted(set(countries))),
    )
    actual = pd.DataFrame.from_dict(
        {
            customer_id: {name: getattr(customer, name) for name in expected.columns}
            for customer_id, customer in result.aggregates.items()
            if customer.lines
        },
        orient="index",
    )

    assert set(actual.index) == set(expected.index)
    for name in expected.columns:
        actual_values = actual[name].to_dict()
        expected_values = expected[name].to_dict()
        differing = sorted(
            customer_id
            for customer_id, value in expected_values.items()
            if actual_values[customer_id] != value
        )
        assert differing == [], f"{name} differs for customers {differing[:5]}"


def test_retail_net_holdings_never_negative(retail_fold: RetailFold) -> None:
    negative = {
        customer_id: code
        for customer_id, customer in retail_fold.result.aggregates.items()
        for code, quantity in customer.net_quantity_by_stock_code.items()
        if quantity <= 0
    }

    assert negative == {}
