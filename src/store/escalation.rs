//! Escalation at send time: a contact in two tiers (or called again in a later pass, or redialled, or
//! alarmed) is not rung twice at once while another call of the incident to them still rings.

use super::Store;

/// Another call of the incident to the same number that is ringing or about to: placed recently
/// (`updated_at` after `$4`) and still waiting for its report, or being placed now. Of two calls
/// being placed at once exactly one waits: a first attempt of tier 0, pass 0 never asks (so it always
/// goes first), and among the others the earlier pass, then tier, then id goes first.
const IN_FLIGHT: &str = "SELECT id FROM deliveries WHERE incident_id = $1 AND phone = $2 \
     AND channel = 'call' AND id <> $3 \
     AND ((status = 'accepted' AND updated_at > $4) \
       OR (status = 'sending' AND ((tier = 0 AND run = 0 AND redials = 0 AND purpose <> 'alarm') \
         OR run < $5 OR (run = $5 AND (tier < $6 OR (tier = $6 AND id < $3)))))) LIMIT 1";

impl Store {
    /// Whether another call of `incident_id` to `phone` is in flight, so that the call `id` (of tier
    /// `tier`, pass `run`; not a first attempt of tier 0, pass 0, which never asks) would ring the
    /// same phone a second time: being placed now (see [`IN_FLIGHT`] for which of two goes first), or
    /// accepted within the last `recent_ms` and not reported yet. A call accepted longer ago without
    /// a report no longer counts: it has stopped ringing.
    pub async fn call_in_flight(
        &self,
        incident_id: &str,
        phone: &str,
        id: &str,
        (tier, run): (i64, i64),
        recent_ms: i64,
    ) -> anyhow::Result<bool> {
        let found: Option<String> = sqlx::query_scalar(IN_FLIGHT)
            .bind(incident_id)
            .bind(phone)
            .bind(id)
            .bind(self.now_ms().saturating_sub(recent_ms))
            .bind(run)
            .bind(tier)
            .fetch_optional(&self.reader)
            .await?;
        Ok(found.is_some())
    }
}
