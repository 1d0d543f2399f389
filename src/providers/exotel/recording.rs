//! Exotel's call recordings: private, asked for with HTTP Basic auth (the API key and token), and
//! there only 1–15 minutes after the call, answering 404 until then, which the fetch job retries.
//! Exotel may answer with an HTML error page and HTTP 200, which the download does not keep.
//!
//! <https://developer.exotel.com/api/call-details>

use secrecy::{ExposeSecret, SecretString};

use super::Account;
use crate::recordings::fetch::Credentials;

/// What a recording URL is asked with: the API key and token when both are set, else nothing (a
/// pre-signed URL carries its own authorisation). The download sends them only to hosts on
/// `recordings.allowed_hosts`.
pub fn credentials(account: &Account) -> Credentials {
    let token = account.api_token.expose_secret();
    if account.api_key.trim().is_empty() || token.trim().is_empty() {
        return Credentials::None;
    }
    Credentials::Basic {
        user: account.api_key.clone(),
        password: SecretString::from(token.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(key: &str, token: &str) -> Account {
        Account {
            base_url: "https://api.exotel.com".into(),
            account_sid: "acme".into(),
            api_key: key.into(),
            api_token: SecretString::from(token.to_owned()),
        }
    }

    #[test]
    fn recordings_are_asked_for_with_the_key_and_token_only_when_both_are_set() {
        match credentials(&account("key-ab12", "token-9z")) {
            Credentials::Basic { user, password } => {
                assert_eq!(user, "key-ab12");
                assert_eq!(password.expose_secret(), "token-9z");
            }
            Credentials::None => panic!("both set, yet no credentials"),
        }
        for (key, token) in [("", "token-9z"), ("key-ab12", " "), (" ", "")] {
            assert!(
                matches!(credentials(&account(key, token)), Credentials::None),
                "{key:?} / {token:?}"
            );
        }
    }
}
