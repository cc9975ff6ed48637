-- 0003_orders: closing orders placed on the CLOB (execute.mode = "clob").
--
-- A trigger row is the order's record: polystream signs the order, stores its
-- body and id here and commits (status 'signed') before the first byte goes to
-- the venue; after a crash the stored body is asked about (GET /data/order/{id})
-- and, if the venue never saw it, sent again as it is, never signed anew
-- (docs/execution.md).  Statuses in clob mode:
--   pending   decided, no order yet
--   signed    signed and stored; sent or about to be, not confirmed
--   placed    accepted by the venue, resting (order_status live / delayed), maybe partly filled
--   filled    fully matched: the position is closed
--   canceled  the venue cancelled the rest (filled_size says what was filled)
--   rejected  refused by the venue (error says why)
--   failed    not confirmed within execute.retry_window (error says why)
--   refused   not sent by polystream (kill switch, daily cap, no price, ...; error says why)
--   dry_run   signed and stored, never sent (execute.enabled = false)

ALTER TABLE markets ADD COLUMN neg_risk boolean;  -- Gamma negRisk: which exchange signs

ALTER TABLE triggers
    ADD COLUMN order_id     text UNIQUE,   -- the venue's orderID: the signed order's EIP-712 hash
    ADD COLUMN order_body   jsonb,         -- the signed POST /order body, sent as is
    ADD COLUMN order_side   text CHECK (order_side IN ('BUY', 'SELL')),
    ADD COLUMN order_size   numeric,       -- shares
    ADD COLUMN order_price  numeric,       -- limit, probability in [0, 1]
    ADD COLUMN notional     numeric,       -- USDC: order_size * order_price
    ADD COLUMN order_status text,          -- the venue's: live, matched, delayed, unmatched, CANCELED...
    ADD COLUMN filled_size  numeric,       -- shares matched so far
    ADD COLUMN error        text,          -- the last refusal or failure, from the venue or ours
    ADD COLUMN attempts     integer NOT NULL DEFAULT 0,  -- POSTs of the stored body
    ADD COLUMN signed_at    timestamptz,
    ADD COLUMN sent_at      timestamptz,   -- first POST
    ADD COLUMN claimed_by   text;          -- the daemon (member id) that signed it

CREATE INDEX triggers_open_orders_idx ON triggers (id) WHERE status IN ('pending', 'signed', 'placed');
CREATE INDEX triggers_sent_at_idx ON triggers (sent_at) WHERE notional IS NOT NULL;
