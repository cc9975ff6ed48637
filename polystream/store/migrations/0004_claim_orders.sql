-- 0004_claim_orders: an order's claim in one statement (execute.mode = "clob").
--
-- polystream_claim_orders moves pending trigger rows to claim_status ('signed',
-- or 'dry_run') with their signed orders, in one call: the order placer runs it
-- on its event loop as a single autocommit statement, so that the claim costs
-- one round trip (polystream/monitor/orders.py).
--   * With 'signed', the daily notional cap is checked first: under a
--     transaction advisory lock (lock_key, 0), the orders signed today (UTC) are
--     summed and each order, in the given order, that would pass cap (USDC) is
--     'refused' with its reason instead.  The sum is a statement after the lock,
--     so it sees every claim committed before the lock was granted.
--   * A row no longer 'pending' (another daemon or task took it) is left alone
--     and not returned.
--   * The rows of to_lock (ids this session does not hold yet) are first locked
--     with session advisory locks (lock_key, id mod 2^31-1), as the placer's
--     facts statement does: one held by another session is not claimed, one
--     locked but not moved is unlocked; a row moved stays locked by the caller's
--     session until the venue's answer is recorded.
--   * The commit is always durable (synchronous_commit on for the transaction):
--     an order is on disk before its first byte goes to the venue.
-- Arguments are parallel arrays, one element per order: sizes in shares,
-- prices (limits) probabilities in [0, 1], bodies the signed POST /order bodies
-- as JSON texts (without the API key).  Returns (trigger_id, status, error) of
-- each row it moved.

-- The cap's sum reads the orders signed today: by index, however long the table grows.
CREATE INDEX triggers_signed_at_idx ON triggers (signed_at) WHERE notional IS NOT NULL;

CREATE FUNCTION polystream_claim_orders(
    ids bigint[], claim_status text, order_ids text[], bodies text[], sides text[],
    sizes numeric[], prices numeric[], cap numeric, member text, lock_key integer,
    to_lock bigint[]
) RETURNS TABLE (trigger_id bigint, status text, error text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_statuses text[] := array_fill(claim_status, ARRAY[cardinality(ids)]);
    v_errors text[] := array_fill(NULL::text, ARRAY[cardinality(ids)]);
    v_locked bigint[];
    v_moved bigint[] := '{}';
    v_spent numeric := 0;
    v_notional numeric;
    v_row record;
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    SELECT coalesce(array_agg(l.id), '{}') INTO v_locked FROM unnest(to_lock) AS l(id)
    WHERE pg_try_advisory_lock(lock_key, mod(l.id, 2147483647)::int);
    FOR i IN 1 .. cardinality(ids) LOOP
        IF ids[i] = ANY(to_lock) AND NOT ids[i] = ANY(v_locked) THEN
            v_statuses[i] := NULL;  -- another task or daemon holds it: not claimed here
        END IF;
    END LOOP;
    IF claim_status = 'signed' AND cardinality(ids) > 0 THEN
        PERFORM pg_advisory_xact_lock(lock_key, 0);
        SELECT coalesce(sum(t.notional), 0) INTO v_spent FROM triggers AS t
        WHERE t.notional IS NOT NULL AND t.status IN ('signed', 'placed', 'filled', 'canceled')
          AND t.signed_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
        FOR i IN 1 .. cardinality(ids) LOOP
            CONTINUE WHEN v_statuses[i] IS NULL;
            v_notional := sizes[i] * prices[i];
            IF v_spent + v_notional > cap THEN
                v_statuses[i] := 'refused';
                v_errors[i] := format('daily notional cap: %s + %s > %s USDC',
                                      v_spent, v_notional, cap);
            ELSE
                v_spent := v_spent + v_notional;
            END IF;
        END LOOP;
    END IF;
    FOR v_row IN
        UPDATE triggers AS t SET status = c.status, order_id = c.order_id,
            order_body = c.body::jsonb, order_side = c.side, order_size = c.size,
            order_price = c.price, notional = c.size * c.price, error = c.error,
            signed_at = now(), claimed_by = member
        FROM unnest(ids, v_statuses, order_ids, bodies, sides, sizes, prices, v_errors)
            AS c(id, status, order_id, body, side, size, price, error)
        WHERE t.id = c.id AND t.status = 'pending' AND c.status IS NOT NULL
        RETURNING t.id AS moved_id, t.status AS moved_status, t.error AS moved_error
    LOOP
        v_moved := v_moved || v_row.moved_id;
        trigger_id := v_row.moved_id;
        status := v_row.moved_status;
        error := v_row.moved_error;
        RETURN NEXT;
    END LOOP;
    PERFORM pg_advisory_unlock(lock_key, mod(l.id, 2147483647)::int)
    FROM unnest(v_locked) AS l(id) WHERE NOT l.id = ANY(v_moved);
END
$$;
