//! The carrier-safe cap: no number is called more than `dispatch.max_calls_per_number_per_hour` times in
//! any hour, across incidents. Indian carriers flag a number dialled too often as spam, and a flagged
//! ExoPhone reaches nobody.
//!
//! The decision is taken inside the transaction that claims the call, so it is atomic with the count:
//! every claimed call leaves a row in `call_placements` (a placement: a provider request for a call,
//! whatever its purpose), and a claim that sent nothing takes its row back when its outcome is recorded.
//! A call over the cap moves from `sending` to `held`, due when the hour allows it, with an event; the
//! dispatcher releases it to `queued` then (and the claim counts again); one held an hour already is given
//! up instead ([`MAX_HELD_MS`]). The first call of an incident to
//! a number is never held: until one of its calls there was accepted by the provider, the contact has not
//! been called for this emergency at all.
//!
//! Replicas: SQLite has one writer, so its claims are serial. On PostgreSQL two replicas may claim calls
//! to one number at once; each takes a transaction-scoped advisory lock per number before counting (in
//! the order of the locks' keys, so two claims never wait on each other in a cycle), so the second waits for the
//! first to commit and then counts its placement too: two replicas never both place the 9th call.

use super::{insert_event, DeliveryRow, Engine, Moved, Store};
use crate::domain::Channel;

/// The cap's window.
pub const HOUR_MS: i64 = 3_600_000;

/// Placements are kept this long: the cap needs an hour, "first call of an incident" needs them for as
/// long as an incident is open (a day by default), and the table stays small.
pub const KEEP_PLACEMENTS_MS: i64 = 2 * 24 * HOUR_MS;

/// What one claim leased, and the calls the cap held back instead of sending.
#[derive(Debug, Clone, Default)]
pub struct Claimed {
    /// Leased: send them.
    pub rows: Vec<DeliveryRow>,
    /// Moved to `held` by the cap, not sent.
    pub held: Vec<HeldCall>,
}

/// A call the cap held back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldCall {
    pub delivery_id: String,
    pub incident_id: String,
    /// Full E.164 number: mask before logging.
    pub phone: String,
    /// Calls placed to the number in the hour before (the cap was reached).
    pub calls_in_hour: i64,
    /// When it is due again (ms since the epoch, by the store's clock).
    pub until: i64,
}

/// Serializes claims of calls to one number across PostgreSQL replicas until the transaction ends. Two
/// keys: a constant naming this lock (`SOS` in ASCII) and the number's [`number_key`]. The count wrapped
/// around it gives the driver a plain integer column to read (the lock function itself returns `void`).
const NUMBER_LOCK: &str =
    "SELECT COUNT(*) FROM (SELECT pg_advisory_xact_lock(5460819, $1)) AS locked";

/// The advisory lock key of a number: the first four bytes of its SHA-256, the same on every replica.
/// Claims take their locks in the order of these keys, not of the numbers: two numbers that share a key
/// are one lock, taken once, so two claims can never each hold what the other waits for.
fn number_key(phone: &str) -> i32 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(phone.as_bytes());
    i32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// The order in which a claim visits its calls (indexes into `phones`): by lock key, then number, so
/// each key's lock is taken once and every claim takes its keys in ascending order.
fn lock_order(phones: &[&str]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..phones.len()).collect();
    order.sort_by_cached_key(|&i| (number_key(phones[i]), phones[i]));
    order
}

const CALLS_IN_HOUR: &str =
    "SELECT COUNT(*) FROM call_placements WHERE phone = $1 AND placed_at > $2";

/// In one round trip: the calls to the number (`$1`) since `$2`, and how many calls of the incident
/// (`$3`) to it the provider accepted (any: a further call is then not the incident's first call there).
const COUNT_AND_REACHED: &str = "SELECT \
     (SELECT COUNT(*) FROM call_placements WHERE phone = $1 AND placed_at > $2) AS in_hour, \
     (SELECT COUNT(*) FROM call_placements WHERE incident_id = $3 AND phone = $1 AND accepted = 1) \
       AS reached";

/// The placement whose leaving the window brings the count below the cap (`$3` = count − cap).
const FREES_A_PLACE: &str = "SELECT placed_at FROM call_placements \
     WHERE phone = $1 AND placed_at > $2 ORDER BY placed_at LIMIT 1 OFFSET $3";

const PLACE: &str = "INSERT INTO call_placements \
     (delivery_id, lease_token, incident_id, phone, placed_at) VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (delivery_id, lease_token) DO NOTHING";

/// From the claim (`$2`) that just leased it: not sent, and not counted as an attempt. Only while its
/// incident is open (or for the follow-up to the person who acknowledged): a call of an acknowledged or
/// resolved incident that a retry brought back goes on to the sender, which cancels it at once, rather
/// than waiting an hour as `held` for nothing.
const HOLD: &str = "UPDATE deliveries SET status = 'held', attempts = attempts - 1, due_at = $3, \
     updated_at = $4, lease_owner = NULL, lease_until = NULL, lease_token = NULL \
     WHERE id = $1 AND lease_token = $2 AND status = 'sending' \
       AND (purpose = 'followup' OR EXISTS (SELECT 1 FROM incidents i \
         WHERE i.id = deliveries.incident_id AND i.status = 'open'))";

/// A claim's call was accepted by the provider.
pub(super) const PLACEMENT_ACCEPTED: &str =
    "UPDATE call_placements SET accepted = 1 WHERE delivery_id = $1 AND lease_token = $2";

/// A claim sent nothing (handed back, cancelled, dry-run): its placement is taken back.
pub(super) const PLACEMENT_TAKEN_BACK: &str =
    "DELETE FROM call_placements WHERE delivery_id = $1 AND lease_token = $2";

impl Engine {
    /// The statement that serializes claims of calls to one number, where replicas can race.
    fn number_lock(self) -> Option<&'static str> {
        match self {
            Engine::Postgres => Some(NUMBER_LOCK),
            // One writer connection: claims are serial already.
            Engine::Sqlite => None,
        }
    }
}

/// Inside the claim's transaction: records a placement for each claimed call, or holds it when its
/// number reached `cap` calls in the last hour and it is not its incident's first call there. Returns the
/// rows still to send and the calls held. `cap` 0 turns the cap off (placements are still recorded, so
/// turning it on later counts the hour before).
pub(super) async fn place_calls(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    engine: Engine,
    rows: Vec<DeliveryRow>,
    token: &str,
    cap: u32,
    now: i64,
) -> anyhow::Result<(Vec<DeliveryRow>, Vec<HeldCall>)> {
    let calls: Vec<usize> = (0..rows.len())
        .filter(|&i| rows[i].channel == Channel::Call)
        .collect();
    if calls.is_empty() {
        return Ok((rows, Vec::new()));
    }
    // One order for every claim: two PostgreSQL claims locking the same numbers never deadlock.
    let phones: Vec<&str> = calls.iter().map(|&i| rows[i].phone.as_str()).collect();
    let calls: Vec<usize> = lock_order(&phones).into_iter().map(|k| calls[k]).collect();
    let mut held = Vec::new();
    let mut is_held = vec![false; rows.len()];
    let mut locked: Option<i32> = None;
    for i in calls {
        let d = &rows[i];
        if cap > 0 {
            if let Some(lock) = engine.number_lock() {
                let key = number_key(&d.phone);
                if locked != Some(key) {
                    sqlx::query_scalar::<_, i64>(lock)
                        .bind(key)
                        .fetch_one(&mut **tx)
                        .await?;
                    locked = Some(key);
                }
            }
            if let Some(h) = over_cap(tx, d, cap, now).await? {
                if hold(tx, d, token, &h, cap, now).await? {
                    held.push(h);
                    is_held[i] = true;
                    continue;
                }
            }
        }
        sqlx::query(PLACE)
            .bind(&d.id)
            .bind(token)
            .bind(&d.incident_id)
            .bind(&d.phone)
            .bind(now)
            .execute(&mut **tx)
            .await?;
    }
    let rows = rows
        .into_iter()
        .zip(is_held)
        .filter_map(|(d, h)| (!h).then_some(d))
        .collect();
    Ok((rows, held))
}

/// `Some` (with its release time) when this call must wait: its number has had `cap` calls in the hour
/// and a call of its incident already reached the number. A first call past the cap goes, and is noted
/// on its trail.
async fn over_cap(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    d: &DeliveryRow,
    cap: u32,
    now: i64,
) -> anyhow::Result<Option<HeldCall>> {
    let since = now - HOUR_MS;
    let (count, reached): (i64, i64) = sqlx::query_as(COUNT_AND_REACHED)
        .bind(&d.phone)
        .bind(since)
        .bind(&d.incident_id)
        .fetch_one(&mut **tx)
        .await?;
    let cap = i64::from(cap);
    if count < cap {
        return Ok(None);
    }
    if reached == 0 {
        let detail = format!(
            "the carrier-safe cap is reached ({count} calls to this number in the last hour, at most \
             {cap}), but this is the incident's first call to it: placed"
        );
        insert_event(&mut **tx, &d.id, "cap_passed", None, &detail, now).await?;
        return Ok(None);
    }
    let frees: Option<i64> = sqlx::query_scalar(FREES_A_PLACE)
        .bind(&d.phone)
        .bind(since)
        .bind(count - cap)
        .fetch_optional(&mut **tx)
        .await?;
    // Leaves the window an hour after it was placed; a minute from now if it cannot be read (a
    // placement deleted meanwhile): the claim then counts again.
    let until = frees.map_or(now + 60_000, |at| (at + HOUR_MS).max(now + 1));
    Ok(Some(HeldCall {
        delivery_id: d.id.clone(),
        incident_id: d.incident_id.clone(),
        phone: d.phone.clone(),
        calls_in_hour: count,
        until,
    }))
}

/// Moves the just-claimed call to `held`, due at `h.until`, with the reason on its trail; false when its
/// incident is no longer open (see [`HOLD`]).
async fn hold(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    d: &DeliveryRow,
    token: &str,
    h: &HeldCall,
    cap: u32,
    now: i64,
) -> anyhow::Result<bool> {
    let held_since: Option<i64> = sqlx::query_scalar(HELD_SINCE)
        .bind(&d.id)
        .fetch_one(&mut **tx)
        .await?;
    if let Some(since) = held_since.filter(|since| now - since >= MAX_HELD_MS) {
        return give_up(tx, d, token, since, cap, now).await;
    }
    let moved = sqlx::query(HOLD)
        .bind(&d.id)
        .bind(token)
        .bind(h.until)
        .bind(now)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    if moved == 0 {
        return Ok(false);
    }
    let detail = format!(
        "held by the carrier-safe cap: this number was called {} times in the last hour (at most {cap}, \
         dispatch.max_calls_per_number_per_hour); due again at {} ({} s from now)",
        h.calls_in_hour,
        iso(h.until),
        (h.until - now).max(0) / 1000
    );
    insert_event(&mut **tx, &d.id, "held", None, &detail, now).await?;
    Ok(true)
}

/// How long a call may wait for the cap before it is given up: an hour is the cap's own window, so a
/// call still held after it waits behind first calls of other emergencies that keep the number full.
/// Placed a day later it would ring a doctor for an emergency long over (and its incident's unreached
/// alarm has long gone out); given up, it says so on its trail.
pub const MAX_HELD_MS: i64 = HOUR_MS;

/// When this call was first held since its last attempt (none: it never was).
const HELD_SINCE: &str =
    "SELECT MIN(at) FROM delivery_events WHERE delivery_id = $1 AND kind = 'held' \
     AND at > COALESCE((SELECT MAX(at) FROM delivery_events WHERE delivery_id = $1 \
       AND kind = 'attempt'), 0)";

/// A held call given up: `cancelled`, with the attempt its claim counted taken back.
const GIVE_UP: &str = "UPDATE deliveries SET status = 'cancelled', attempts = attempts - 1, \
     finished_at = $3, updated_at = $3, lease_owner = NULL, lease_until = NULL, lease_token = NULL \
     WHERE id = $1 AND lease_token = $2 AND status = 'sending'";

/// Ends a call the cap has held for [`MAX_HELD_MS`]: cancelled with an event and a warning, never
/// silently. `false` when the claim no longer owns it.
async fn give_up(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    d: &DeliveryRow,
    token: &str,
    since: i64,
    cap: u32,
    now: i64,
) -> anyhow::Result<bool> {
    let moved = sqlx::query(GIVE_UP)
        .bind(&d.id)
        .bind(token)
        .bind(now)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    if moved == 0 {
        return Ok(false);
    }
    let detail = format!(
        "not placed: the carrier-safe cap (at most {cap} calls an hour to this number) has held this call \
         since {} and the number is still full; given up rather than ringing this late",
        iso(since)
    );
    insert_event(&mut **tx, &d.id, "cancelled", None, &detail, now).await?;
    tracing::warn!(
        delivery_id = %d.id,
        incident_id = %d.incident_id,
        phone = %crate::domain::mask(&d.phone),
        "a call held by the carrier-safe cap for an hour was given up"
    );
    Ok(true)
}

/// Held calls due by `$2`, back to the queue.
const RELEASE_HELD: &str = "UPDATE deliveries SET status = 'queued', updated_at = $1 \
     WHERE channel = 'call' AND status = 'held' AND due_at <= $2 RETURNING id, channel, status";

impl Store {
    /// Moves held calls due by `due_by` back to `queued` (the claim then counts again), each with an
    /// event saying `why`; wakes every replica's dispatcher when any moved. The dispatcher calls it with
    /// now; the auditor with a time well past, for calls nobody released.
    pub async fn release_held(&self, due_by: i64, why: &str) -> anyhow::Result<Vec<Moved>> {
        self.yield_to_intake().await;
        let now = self.now_ms();
        let mut tx = self.writer.begin().await?;
        let moved: Vec<Moved> = sqlx::query_as(RELEASE_HELD)
            .bind(now)
            .bind(due_by)
            .fetch_all(&mut *tx)
            .await?;
        for m in &moved {
            insert_event(&mut *tx, &m.delivery_id, "released", None, why, now).await?;
        }
        if let (false, Some(notify)) = (moved.is_empty(), self.engine.wake_on_commit()) {
            sqlx::query(notify).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(moved)
    }

    /// Deletes placements older than [`KEEP_PLACEMENTS_MS`]; how many.
    pub async fn prune_call_placements(&self) -> anyhow::Result<u64> {
        let before = self.now_ms() - KEEP_PLACEMENTS_MS;
        let gone = sqlx::query("DELETE FROM call_placements WHERE placed_at < $1")
            .bind(before)
            .execute(&self.writer)
            .await?
            .rows_affected();
        Ok(gone)
    }

    /// Calls placed to `phone` in the hour before now, by the store's clock (for tests and operators).
    pub async fn calls_in_last_hour(&self, phone: &str) -> anyhow::Result<i64> {
        let n = sqlx::query_scalar(CALLS_IN_HOUR)
            .bind(phone)
            .bind(self.now_ms() - HOUR_MS)
            .fetch_one(&self.reader)
            .await?;
        Ok(n)
    }
}

/// A time for an audit trail, UTC.
pub(super) fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Two numbers whose lock keys are equal: 32 bits collide within a few hundred thousand numbers.
    fn colliding_pair() -> (String, String) {
        let mut seen: HashMap<i32, String> = HashMap::new();
        for n in 0..2_000_000u32 {
            let phone = format!("+9198{n:08}");
            if let Some(first) = seen.insert(number_key(&phone), phone.clone()) {
                return (first, phone);
            }
        }
        panic!("no two of two million numbers share a 32-bit key");
    }

    #[test]
    fn claims_take_each_lock_once_and_in_ascending_key_order() {
        let (a, b) = colliding_pair();
        assert_eq!(number_key(&a), number_key(&b));
        // Ordered by number, a claim of these would take the shared key, then another, then the
        // shared key again, and another claim could hold that other while waiting for the shared one.
        let others = ["+919700000000", "+919800000000", "+919900000000"];
        for phones in [
            vec![b.as_str(), others[1], a.as_str(), others[0]],
            vec![others[2], b.as_str(), others[1]],
            vec![a.as_str(), others[1], b.as_str(), a.as_str(), others[0]],
        ] {
            let keys: Vec<i32> = lock_order(&phones)
                .into_iter()
                .map(|i| number_key(phones[i]))
                .collect();
            // Ascending: each key's calls are visited together, so its lock is taken once, and no
            // claim takes a smaller key after a larger one.
            assert!(
                keys.windows(2).all(|w| w[0] <= w[1]),
                "{phones:?}: {keys:?}"
            );
        }
        assert_eq!(number_key("+919800000001"), number_key("+919800000001"));
    }
}
