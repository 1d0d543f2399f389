//! Escalation at send time: a contact in two tiers (or called again in a later pass) is not rung twice
//! at once when an earlier call to them, or its redial, is still ringing when their next tier comes.

use super::Store;

/// Another call of the incident to the same number that is ringing or about to: being placed now
/// (only an earlier tier's or pass's, so two calls due together never wait for each other), or placed
/// recently (`updated_at` after `$4`) and still waiting for its report.
const IN_FLIGHT: &str = "SELECT id FROM deliveries WHERE incident_id = $1 AND phone = $2 \
     AND channel = 'call' AND id <> $3 \
     AND ((status = 'accepted' AND updated_at > $4) \
       OR (status = 'sending' AND (run < $5 OR (run = $5 AND tier < $6)))) LIMIT 1";

impl Store {
    /// Whether another call of `incident_id` to `phone` is in flight, so that the call `id` (of tier
    /// `tier`, pass `run`) would ring the same phone a second time: being placed now (an earlier
    /// tier's or pass's), or accepted within the last `recent_ms` and not reported yet. A call
    /// accepted longer ago without a report no longer counts: it has stopped ringing.
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
