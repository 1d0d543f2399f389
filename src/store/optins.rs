//! WhatsApp opt-ins recorded with GupShup, so each number's `OPT_IN` is sent once.

use super::Store;

impl Store {
    /// Whether `phone` (E.164) was opted in before.
    pub async fn opted_in(&self, phone: &str) -> anyhow::Result<bool> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT opted_in_at FROM whatsapp_optins WHERE phone = $1")
                .bind(phone)
                .fetch_optional(&self.reader)
                .await?;
        Ok(found.is_some())
    }

    /// Records that GupShup opted `phone` (E.164) in; a repeat keeps the first time.
    pub async fn record_opt_in(&self, phone: &str) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO whatsapp_optins (phone, opted_in_at) VALUES ($1, $2) \
             ON CONFLICT (phone) DO NOTHING",
        )
        .bind(phone)
        .bind(self.now_ms())
        .execute(&self.writer)
        .await?;
        Ok(())
    }
}
