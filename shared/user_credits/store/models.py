"""PynamoDB models for the four tables that template.yaml declares.

Table names are not known at import time (they come from the environment), so `bind_tables` sets them
on every model before the first call of each invocation.

Accounts table (hash `userId`, range `sk`) holds one user's balances (`GROUP#<group>`) and orders
(`ORDER#<orderId>`) side by side, so that `GET /credits` is a single Query. The ledger lives in its own
table so that a hot balance does not share its partition's write capacity with its own history.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from botocore.config import Config
from pynamodb.attributes import (
    BooleanAttribute,
    DiscriminatorAttribute,
    JSONAttribute,
    NumberAttribute,
    UnicodeAttribute,
    UTCDateTimeAttribute,
)
from pynamodb.connection import Connection
from pynamodb.indexes import GlobalSecondaryIndex, KeysOnlyProjection
from pynamodb.models import Model

from user_credits.config import Settings

GROUP_PREFIX = "GROUP#"
BOOK_PREFIX = "BOOK#"
ORDER_PREFIX = "ORDER#"
LIMIT_PREFIX = "LIMIT#"
SUBSCRIPTION_PREFIX = "SUB#"
INVOICE_PREFIX = "INVOICE#"
CUSTOMER_SK = "CUSTOMER"


class OfferRecord(Model):
    class Meta:
        table_name = "unbound-offers"

    offerId = UnicodeAttribute(hash_key=True)
    # The whole validated offer as JSON: offers are always read and written whole.
    document = JSONAttribute()
    updatedAt = UTCDateTimeAttribute()


class DueIndex(GlobalSecondaryIndex["BalanceRecord"]):
    """Sparse: only balances with a lot that holds tokens and expires carry `dueShard` and `dueSort`.

    Keys only, and keyed on what a consume never changes (`nextExp`), so a consume never writes it.
    `dueShard` is one of `DUE_SHARDS` partition keys picked by a hash of (user, group): what falls due
    at one moment is spread over all of them, never one partition per day. `dueSort` is
    `<iso nextExp>#<userId>#<group>`, so the sweep reads each shard from its position up to now.
    """

    class Meta:
        index_name = "byDue"
        projection = KeysOnlyProjection()

    dueShard = UnicodeAttribute(hash_key=True)
    dueSort = UnicodeAttribute(range_key=True)


class PaymentIntentIndex(GlobalSecondaryIndex["OrderRecord"]):
    """Sparse: finds an order from a Stripe charge, which names only its PaymentIntent."""

    class Meta:
        index_name = "byPaymentIntent"
        projection = KeysOnlyProjection()

    paymentIntentId = UnicodeAttribute(hash_key=True)


class AccountItem(Model):
    class Meta:
        table_name = "unbound-accounts"

    userId = UnicodeAttribute(hash_key=True)
    sk = UnicodeAttribute(range_key=True)
    itemType = DiscriminatorAttribute()


class BalanceRecord(AccountItem, discriminator="balance"):
    offerGroup = UnicodeAttribute()
    # The spendable total: every consume decrements it under a condition, and nothing else of the item.
    balance = NumberAttribute(default=0)
    # The group's expiresAt (SPEC 1: the latest among its lots); None: never, or no lot.
    expiresAt = UTCDateTimeAttribute(null=True)
    # The soonest expiry of a lot that held tokens at the last rewrite: consumes are allowed before it.
    nextExp = UTCDateTimeAttribute(null=True)
    # The version of the group's book (its own item, BookRecord): bumped by every rewrite, never by a consume.
    bookVer = NumberAttribute(null=True)
    # Set by a rewrite made without a transaction: the token of the book prepared for `bookVer` on the
    # book item (`p_<token>`), until that book is promoted there (see `store.balances.rewrite_group`).
    bookTok = UnicodeAttribute(null=True)
    # Incremented by every change: the order of the ledger entries of this group, and the
    # optimistic-concurrency token of the read-then-write paths (purchase, refund, grant, expiry).
    seq = NumberAttribute(default=0)
    dueShard = UnicodeAttribute(null=True)
    dueSort = UnicodeAttribute(null=True)
    # When the group was last rewritten (a purchase, grant, refund, expiry or fold). The hot writes
    # (consume, hold, settle, release) leave it alone: DynamoDB's work grows with each attribute a write
    # sets, and their `change` says when each happened.
    updatedAt = UTCDateTimeAttribute(null=True)
    # What the last write did (`domain.changes.Change` as JSON): the stream function's input.
    change = UnicodeAttribute(null=True)

    byDue = DueIndex()


class BookRecord(AccountItem, discriminator="book"):
    """A group's lots and debt as the last rewrite left them (`BOOK#<group>`, beside its balance item).

    An item of its own because DynamoDB charges a write by the whole item: a consume writes only the
    small balance item, whatever the lots. Written with the balance in the rewrites' transactions, read
    with it in one BatchGetItem; `ver` equals the balance item's `bookVer`, or is one behind it while a
    rewrite made without a transaction has swung the balance to a book prepared here (`p_<token>`) and
    not yet promoted it (`store.balances.rewrite_group`).
    """

    offerGroup = UnicodeAttribute()
    book = JSONAttribute()
    ver = NumberAttribute()


class OrderRecord(AccountItem, discriminator="order"):
    orderId = UnicodeAttribute()
    offerId = UnicodeAttribute()
    offerGroup = UnicodeAttribute()
    quantity = NumberAttribute()
    amount = NumberAttribute()
    currency = UnicodeAttribute()
    status = UnicodeAttribute()
    tokens = NumberAttribute()
    createdAt = UTCDateTimeAttribute()
    startsAt = UTCDateTimeAttribute(null=True)
    expiresAt = UTCDateTimeAttribute(null=True)
    paymentIntentId = UnicodeAttribute(null=True)
    # What was credited, per group, so a refund revokes proportionally from each (JSON list).
    credits = JSONAttribute(null=True)
    # Tokens already accounted for by refunds (revoked or recorded as shortfall).
    revokedTokens = NumberAttribute(default=0)
    amountRefunded = NumberAttribute(default=0)
    # Stripe's cumulative amount_refunded of a refund that arrived before its payment: applied with it.
    pendingRefund = NumberAttribute(null=True)
    # The Checkout Session the service created for this order (SPEC 2.10: only that session pays it).
    sessionId = UnicodeAttribute(null=True)
    # `payment` or `subscription` for an order made by POST /checkout.
    checkoutMode = UnicodeAttribute(null=True)
    # The offer as it was when ordered, so that a catalog change cannot alter what was bought.
    offerSnapshot = JSONAttribute(null=True)
    # The last write's events with no balance change (PaymentInconsistent), for the stream function.
    change = UnicodeAttribute(null=True)

    byPaymentIntent = PaymentIntentIndex()


class PurchaseLimitRecord(AccountItem, discriminator="limit"):
    """One per user and offer with a `perUserLimit` (`LIMIT#<offerId>`): every order of that offer is
    created in a transaction that bumps `ver` from the value read, so two orders created at once cannot
    both pass the count of the user's orders (the loser counts again)."""

    ver = NumberAttribute()


class CustomerRecord(AccountItem, discriminator="customer"):
    """The user's one Stripe Customer (`CUSTOMER`), created once (SPEC 2.10)."""

    customerId = UnicodeAttribute()
    createdAt = UTCDateTimeAttribute()


class SubscriptionRecord(AccountItem, discriminator="subscription"):
    """A Stripe subscription of the user (`SUB#<id>`), as the webhook last learnt it."""

    subscriptionId = UnicodeAttribute()
    offerId = UnicodeAttribute()
    offerGroup = UnicodeAttribute()
    orderId = UnicodeAttribute()
    quantity = NumberAttribute()
    status = UnicodeAttribute()
    currentPeriodEnd = UTCDateTimeAttribute(null=True)
    cancelAtPeriodEnd = BooleanAttribute(default=False)
    # Stripe's `created` of the subscription event the status came from: an older one changes nothing.
    statusAt = NumberAttribute(default=0)
    # The last write's events (SubscriptionPaymentFailed, SubscriptionCanceled), for the stream function.
    change = UnicodeAttribute(null=True)


class InvoiceRecord(AccountItem, discriminator="invoice"):
    """An invoice that credited its lot (`INVOICE#<id>`): written with that credit, so it happens once."""

    invoiceId = UnicodeAttribute()
    subscriptionId = UnicodeAttribute()
    creditedAt = UTCDateTimeAttribute()


class SweepProgressRecord(AccountItem, discriminator="sweep"):
    """The expiry sweep's stored position (one item, userId "#sweep"; see store.expiry). Declared here so
    that every reader of the accounts table knows its discriminator."""

    expireCursor = UnicodeAttribute(null=True)
    updatedAt = UTCDateTimeAttribute(null=True)


class LedgerRecord(Model):
    """One balance change. `entryKey` sorts by time (newest last), so reads go backwards.

    No index: an index would double the write units of every entry, and entries are written once per
    consume. A read of one group filters the user's partition (see `store.ledger.read_page`).
    """

    class Meta:
        table_name = "unbound-ledger"

    userId = UnicodeAttribute(hash_key=True)
    entryKey = UnicodeAttribute(range_key=True)
    offerGroup = UnicodeAttribute()
    delta = NumberAttribute()
    balanceAfter = NumberAttribute()
    reason = UnicodeAttribute()
    seq = NumberAttribute()
    at = UTCDateTimeAttribute()
    orderId = UnicodeAttribute(null=True)
    idempotencyKey = UnicodeAttribute(null=True)
    # Tokens a refund could not revoke because the balance would have gone below 0.
    shortfall = NumberAttribute(null=True)
    # A grant's free-text reason.
    note = UnicodeAttribute(null=True)
    # The lot the change concerns, where it concerns one.
    lotId = UnicodeAttribute(null=True)
    # The hold it came from (reasons hold, release, and a settle's excess consume).
    holdId = UnicodeAttribute(null=True)
    # The subscription whose invoice credited it (reasons purchase, renewal).
    subscriptionId = UnicodeAttribute(null=True)


class IdempotencyRecord(Model):
    """A request's `Idempotency-Key` (per user and route) and the response it got; expires after 24 h."""

    class Meta:
        table_name = "unbound-idempotency"

    key = UnicodeAttribute(hash_key=True)
    requestHash = UnicodeAttribute()
    status = UnicodeAttribute()  # in_progress | completed
    statusCode = NumberAttribute(null=True)
    response = JSONAttribute(null=True)
    ttl = NumberAttribute()
    createdAt = UTCDateTimeAttribute()


ALL_MODELS: tuple[type[Model], ...] = (OfferRecord, AccountItem, LedgerRecord, IdempotencyRecord)

_bound: tuple[str, str, str, str] | None = None


def bind_tables(settings: Settings) -> None:
    """Point every model at the configured tables (cheap; only rebinds when the names change)."""
    global _bound
    names = (settings.offers_table, settings.accounts_table, settings.ledger_table, settings.idempotency_table)
    if _bound == names:
        return
    OfferRecord.Meta.table_name = settings.offers_table
    for account_model in (AccountItem, BalanceRecord, BookRecord, OrderRecord, PurchaseLimitRecord,
                          CustomerRecord, SubscriptionRecord, InvoiceRecord, SweepProgressRecord):
        account_model.Meta.table_name = settings.accounts_table
    LedgerRecord.Meta.table_name = settings.ledger_table
    IdempotencyRecord.Meta.table_name = settings.idempotency_table
    models: tuple[type[Model], ...] = (
        OfferRecord, AccountItem, BalanceRecord, BookRecord, OrderRecord, PurchaseLimitRecord, CustomerRecord,
        SubscriptionRecord, InvoiceRecord, SweepProgressRecord, LedgerRecord, IdempotencyRecord,
    )
    for model in models:
        # A cached connection keeps the old table name (and the old endpoint).
        model._connection = None
    global _generation
    _generation += 1
    _bound = names


_generation = 0
_per_thread = threading.local()


def shared_connection() -> Connection:
    """The low-level connection for transactions: one per thread, dropped whenever the tables are rebound.

    Building a botocore client parses its service model (~170 ms), so it must not happen per commit.
    """
    cached = getattr(_per_thread, "connection", None)
    if cached is None or cached[0] != _generation:
        cached = (_generation, Connection())
        _per_thread.connection = cached
    connection: Connection = cached[1]
    return connection


def single_attempt_client() -> Any:
    """A client of the Accounts table's connection that sends each request once: for writes that must
    not be resent by botocore after an answer lost on the way (a consume's debit: see
    `store.consumption`; a fold's swing: see `store.balances.rewrite_group`); the one loop retries what
    is safe. Without botocore's client-side parameter check: these requests are built by the store and
    checked by the suite, DynamoDB still rejects a bad one, and the check is ~0.07 ms of a consume's
    ~0.9 ms of CPU."""
    connection = BalanceRecord._get_connection().connection
    client = _single_attempt.get(connection)
    if client is None:
        base = connection.client
        client = connection.session.create_client(
            "dynamodb", base.meta.region_name, endpoint_url=base.meta.endpoint_url,
            config=base.meta.config.merge(Config(retries={"total_max_attempts": 1, "mode": "standard"},
                                                 parameter_validation=False)),
        )
        _single_attempt[connection] = client
    return client


# One per pynamodb connection (a rebind of the tables makes new ones).
_single_attempt: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def group_sk(offer_group: str) -> str:
    return GROUP_PREFIX + offer_group


def book_sk(offer_group: str) -> str:
    return BOOK_PREFIX + offer_group


def order_sk(order_id: str) -> str:
    return ORDER_PREFIX + order_id


def raw_item(record: Model) -> dict[str, Any]:
    """The record serialized the way DynamoDB stores it (for transactions built by hand)."""
    data: dict[str, Any] = record.serialize()
    return data
