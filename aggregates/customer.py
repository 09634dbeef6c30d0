"""The customer aggregate: one per customer of an online shop, fed by invoice lines.

Built for the UCI Online Retail data set: every invoice line of a UK gift
retailer from 2010-12 to 2011-12. An invoice number with prefix ``C`` is a
cancellation, whose lines return goods or credit the customer, and prefix
``A`` is a bad-debt adjustment. Standard library only.
"""

from __future__ import annotations

import re
from datetime import datetime

from aggregates.aggregate import Aggregate, NewEvent, applies, handles, reject
from aggregates.errors import InvalidCommandError
from aggregates.messages import Command, Field, JsonObject

CANCELLATION_PREFIX = "C"
ADJUSTMENT_PREFIX = "A"

_INVOICE_NO = re.compile(r"[AC]?\d+")

# Stock codes of goods start with five digits (85123A, 22423). The other codes
# are charges and credits: postage (POST, DOT, C2), discounts (D), manual
# entries (M), bank charges, fees, commissions, samples and gift vouchers.
_GOODS_STOCK_CODE = re.compile(r"\d{5}")


class Customer(Aggregate):
    """The invoice lines of one customer: purchases, returns and spend.

    A line of a sales invoice must have a positive quantity and becomes
    ItemPurchased. A line of a cancellation invoice must have a negative
    quantity and becomes ItemReturned. A line is also rejected when its unit
    price is not positive or it belongs to a bad-debt adjustment invoice. The
    last rule rejects a return of more units of a stock code of goods than the
    customer has bought and not yet returned.
    """

    id_field = "customer_id"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.lines = 0
        self.invoices = 0
        self.lines_by_invoice: dict[str, int] = {}
        self.quantity_purchased = 0
        self.quantity_returned = 0
        # Sum of quantity * unit price over every line, in pence, so returns
        # lower it. Integers keep the sum exact.
        self.spend_pence = 0
        self.countries: list[str] = []
        self.first_invoice_at: str | None = None
        self.last_invoice_at: str | None = None
        # Units bought minus units returned, per stock code of goods. A code
        # whose count is back to zero is removed.
        self.net_quantity_by_stock_code: dict[str, int] = {}

    @classmethod
    def validate(cls, command: Command) -> None:
        """Raise InvalidCommandError unless id, invoice number and date are valid."""
        super().validate(command)
        if not command.aggregate_id.isdigit():
            msg = f"customer_id must be digits, got {command.aggregate_id!r}"
            raise InvalidCommandError(msg, field="customer_id")
        invoice_no = command.payload["invoice_no"]
        if not _INVOICE_NO.fullmatch(invoice_no):
            msg = (
                "payload.invoice_no must be digits with an optional C or A "
                f"prefix, got {invoice_no!r}"
            )
            raise InvalidCommandError(msg, field="payload.invoice_no")
        parse_invoice_date(command.payload["invoice_date"])

    @handles(
        "RecordInvoiceLine",
        {
            "invoice_no": Field(str, max_length=16),
            "stock_code": Field(str, max_length=32),
            "description": Field(str, required=False, nullable=True, max_length=256),
            "quantity": Field(int),
            "unit_price": Field((int, float)),
            "invoice_date": Field(str, max_length=64),
            "country": Field(str, max_length=64),
            "line_number": Field(int, min_value=0),
        },
    )
    def record_invoice_line(self, command: Command) -> list[NewEvent]:
        line = _invoice_line(command)
        invoice_no = line["invoice_no"]
        quantity = line["quantity"]
        where = (
            f"line {line['line_number']} (invoice {invoice_no}, "
            f"stock code {line['stock_code']})"
        )

        if invoice_no.startswith(ADJUSTMENT_PREFIX):
            msg = (
                f"{where} is a bad-debt adjustment, which is not recorded "
                f"against customer {self.aggregate_id}"
            )
            raise reject(msg)
        if line["unit_price"] <= 0:
            msg = f"{where} has unit price {line['unit_price']}, which is not positive"
            raise reject(msg)

        if invoice_no.startswith(CANCELLATION_PREFIX):
            if quantity >= 0:
                msg = (
                    f"{where} has quantity {quantity}, but a line of a "
                    "cancellation invoice needs a negative quantity"
                )
                raise reject(msg)
            self._check_return(line, where)
            return [("ItemReturned", line)]

        if quantity <= 0:
            msg = (
                f"{where} has quantity {quantity}, but a line of a sales "
                "invoice needs a positive quantity. Record returns on a "
                "cancellation invoice (prefix C)."
            )
            raise reject(msg)
        return [("ItemPurchased", line)]

    @applies("ItemPurchased")
    def _item_purchased(self, payload: JsonObject) -> None:
        self._count_line(payload)
        self.quantity_purchased += payload["quantity"]

    @applies("ItemReturned")
    def _item_returned(self, payload: JsonObject) -> None:
        self._count_line(payload)
        self.quantity_returned -= payload["quantity"]

    def _check_return(self, line: JsonObject, where: str) -> None:
        stock_code = line["stock_code"]
        if not is_goods(stock_code):
            return
        returned = -line["quantity"]
        not_returned = self.net_quantity_by_stock_code.get(stock_code, 0)
        if returned > not_returned:
            msg = (
                f"{where} returns {returned} units, but customer "
                f"{self.aggregate_id} has bought {not_returned} units of that stock "
                "code and not returned them"
            )
            raise reject(msg)

    def _count_line(self, payload: JsonObject) -> None:
        self.lines += 1
        self.spend_pence += payload["amount_pence"]

        invoice_no = payload["invoice_no"]
        if invoice_no not in self.lines_by_invoice:
            self.invoices += 1
        self.lines_by_invoice[invoice_no] = self.lines_by_invoice.get(invoice_no, 0) + 1

        country = payload["country"]
        if country not in self.countries:
            self.countries = sorted([*self.countries, country])

        # Both times are ISO 8601 without an offset, in the same format, so
        # comparing the strings compares the times.
        invoice_date = payload["invoice_date"]
        if self.first_invoice_at is None or invoice_date < self.first_invoice_at:
            self.first_invoice_at = invoice_date
        if self.last_invoice_at is None or invoice_date > self.last_invoice_at:
            self.last_invoice_at = invoice_date

        stock_code = payload["stock_code"]
        if is_goods(stock_code):
            net = self.net_quantity_by_stock_code.get(stock_code, 0)
            net += payload["quantity"]
            if net:
                self.net_quantity_by_stock_code[stock_code] = net
            else:
                self.net_quantity_by_stock_code.pop(stock_code, None)


def is_goods(stock_code: str) -> bool:
    """Return True if the stock code names goods, not a charge or a credit."""
    return _GOODS_STOCK_CODE.match(stock_code) is not None


def parse_invoice_date(value: str) -> datetime:
    """Parse an ISO 8601 local time without a UTC offset.

    Raises InvalidCommandError naming ``payload.invoice_date`` otherwise.
    """
    field = "payload.invoice_date"
    try:
        invoice_date = datetime.fromisoformat(value)
    except ValueError as err:
        msg = f"{field} must be an ISO 8601 time, got {value!r}"
        raise InvalidCommandError(msg, field=field) from err
    if invoice_date.tzinfo is not None:
        msg = f"{field} must be a local time without a UTC offset, got {value!r}"
        raise InvalidCommandError(msg, field=field)
    return invoice_date


def _invoice_line(command: Command) -> JsonObject:
    """Return the event payload of a line: its fields, normalised, and its amount."""
    payload = command.payload
    quantity = payload["quantity"]
    unit_price = payload["unit_price"]
    return {
        "invoice_no": payload["invoice_no"],
        "stock_code": payload["stock_code"],
        "description": payload.get("description"),
        "quantity": quantity,
        "unit_price": unit_price,
        "amount_pence": round(quantity * unit_price * 100),
        "invoice_date": parse_invoice_date(payload["invoice_date"]).isoformat(),
        "country": payload["country"],
        "line_number": payload["line_number"],
    }
