//! Channel fallback: a contact no call reached gets their SMS and WhatsApp once more, with the fallback
//! text ("We could not reach you by phone: …").

use super::{insert_event, Store};
use crate::domain::{storable, Channel};

/// The message deliveries of open incidents' contacts whom no call has reached so far, and who have
/// no fallback yet: one row per message channel to send again, with the lane that sent it.
///
/// With escalation a contact can have several calls (one per tier they are in, one per pass), most
/// of them waiting in the queue for their tier. Precisely, for one contact (by number) of one incident,
/// the fallback is due when:
/// - at least one call to them has ended (any state but `queued`, `held`, `sending`, `accepted` and
///   `cancelled`: a cancelled call was never placed);
/// - every call that ended, ended not reached: `failed`, or `answered` without the keypress
///   (voicemail answers calls too);
/// - no call is pending now: `sending` or `accepted`, or `queued`/`held` and either tried before (a
///   redial or a retry waiting) or due already (`due_at <= $1`, about to be placed). A later tier's
///   or a later pass's call not yet due is not pending: it neither blocks the fallback nor counts.
///
/// Each contact gets it at most once per incident (a unique index): if a later tier's call then
/// fails too, the messages do not go a third time.
const CANDIDATES: &str = "SELECT DISTINCT m.incident_id, m.contact_name, m.phone, m.channel, m.provider \
     FROM deliveries m JOIN incidents i ON i.id = m.incident_id \
     WHERE i.status = 'open' AND m.purpose = 'alert' AND m.channel IN ('sms', 'whatsapp') \
       AND EXISTS (SELECT 1 FROM deliveries c WHERE c.incident_id = m.incident_id AND c.phone = m.phone \
         AND c.channel = 'call' \
         AND c.status NOT IN ('queued', 'held', 'sending', 'accepted', 'cancelled')) \
       AND NOT EXISTS (SELECT 1 FROM deliveries c WHERE c.incident_id = m.incident_id \
         AND c.phone = m.phone AND c.channel = 'call' \
         AND c.status NOT IN ('queued', 'held', 'sending', 'accepted', 'cancelled', 'failed', 'answered')) \
       AND NOT EXISTS (SELECT 1 FROM deliveries c WHERE c.incident_id = m.incident_id \
         AND c.phone = m.phone AND c.channel = 'call' \
         AND (c.status IN ('sending', 'accepted') \
           OR (c.status IN ('queued', 'held') \
             AND (c.attempts > 0 OR c.redials > 0 OR c.due_at <= $1)))) \
       AND NOT EXISTS (SELECT 1 FROM deliveries f WHERE f.incident_id = m.incident_id \
         AND f.phone = m.phone AND f.purpose = 'fallback') \
     ORDER BY m.incident_id, m.phone, m.channel";

/// Only while the incident is open, checked in the same statement.
const INSERT: &str =
    "INSERT INTO deliveries (id, incident_id, contact_name, phone, channel, provider, \
     priority, greeting_ref, link_ref, purpose, status, due_at, created_at, updated_at) \
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, 'fallback', 'queued', $10, $10, $10 \
     WHERE EXISTS (SELECT 1 FROM incidents WHERE id = $2 AND status = 'open') \
     ON CONFLICT DO NOTHING RETURNING id";

#[derive(Debug, Clone, sqlx::FromRow)]
struct Candidate {
    incident_id: String,
    contact_name: String,
    phone: String,
    #[sqlx(try_from = "String")]
    channel: Channel,
    provider: String,
}

impl Store {
    /// Queues the fallback messages that are due; how many. Each at most once (a unique index), so
    /// replicas running this together queue each once.
    pub async fn queue_fallbacks(&self) -> anyhow::Result<usize> {
        let candidates: Vec<Candidate> = sqlx::query_as(CANDIDATES)
            .bind(self.now_ms())
            .fetch_all(&self.reader)
            .await?;
        let mut queued = 0;
        for c in candidates {
            let now = self.now_ms();
            let mut tx = self.writer.begin().await?;
            let id: Option<String> = sqlx::query_scalar(INSERT)
                .bind(uuid::Uuid::new_v4().to_string())
                .bind(&c.incident_id)
                .bind(storable(&c.contact_name).into_owned())
                .bind(&c.phone)
                .bind(c.channel.as_str())
                .bind(&c.provider)
                .bind(c.channel.priority())
                .bind(crate::messages::new_reference())
                .bind(crate::messages::new_link_ref())
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(id) = id {
                insert_event(
                    &mut *tx,
                    &id,
                    "queued",
                    None,
                    "fallback: no call reached this contact; the message goes again",
                    now,
                )
                .await?;
                if let Some(wake) = self.engine.wake_on_commit() {
                    sqlx::query(wake).execute(&mut *tx).await?;
                }
                queued += 1;
            }
            tx.commit().await?;
        }
        Ok(queued)
    }
}
