//! The token of Exotel's webhooks (`/exotel/*`), and who a refused request looks like: Exotel's own
//! flow still using an old token, which pages people (see `app::alarms`), or a stranger (a scanner),
//! which is counted and reported but pages nobody.

use axum::response::{IntoResponse, Response};

use crate::app::alarms::Sender;
use crate::domain::{CallSid, Phone};
use crate::error::AppError;
use crate::http::params::Params;
use crate::http::AppState;

/// Longest number field read when telling Exotel from a stranger: a phone number in any spelling
/// fits, and nobody's junk is handed to the phone number parser.
const MAX_NUMBER_CHARS: usize = 32;

/// On the answer to a stranger's refused request: the request counter labels it
/// `status="not_exotel"` rather than with its status code, so that scanners do not look like Exotel
/// being refused.
#[derive(Debug, Clone, Copy)]
pub struct NotExotel;

/// A request refused for a missing or wrong token, and who it looks like it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub Sender);

impl Refused {
    /// Logs Exotel's refusal as `what`; a stranger's is logged by the watch, at most once a minute.
    pub fn log(self, what: &'static str) {
        if self.0 == Sender::Exotel {
            tracing::warn!("{what}");
        }
    }

    /// Marks `res` as the answer to a stranger (see [`NotExotel`]).
    pub fn mark(self, res: &mut Response) {
        if self.0 == Sender::Stranger {
            res.extensions_mut().insert(NotExotel);
        }
    }

    /// Logs it as `what` and answers `401`.
    pub fn answer(self, what: &'static str) -> Response {
        self.log(what);
        let mut res = AppError::Unauthorized.into_response();
        self.mark(&mut res);
        res
    }
}

/// Checks the request's `token` in constant time (see [`AppState::exotel_token_ok`], which also
/// watches for bursts of wrong ones); `Err` with who a refused request looks like.
pub fn check(state: &AppState, params: &Params) -> Result<(), Refused> {
    let mut sender = Sender::Exotel;
    let ok = state.exotel_token_ok(params.get("token").as_deref(), || {
        sender = sender_of(state, params);
        sender
    });
    if ok {
        Ok(())
    } else {
        Err(Refused(sender))
    }
}

/// Who a request looks like it came from. Exotel for this account sends its parameters: a CallSid of
/// its form, a caller (`CallFrom` or `From`) and one of our numbers (`exotel.inbound_numbers`,
/// `exotel.caller_id`) as `CallTo` or `To` (`PhoneNumberSid` in a call's status callback), in any
/// spelling (`08069891522`, `+918069891522`, `00918069891522`). Anything else is a stranger's.
pub fn sender_of(state: &AppState, params: &Params) -> Sender {
    let exotel_sid = params
        .get("CallSid")
        .and_then(|s| CallSid::parse(&s).ok())
        .is_some_and(|s| s.is_exotel_form());
    if !exotel_sid || params.get_any(&["CallFrom", "From"]).is_none() {
        return Sender::Stranger;
    }
    let region = state.region();
    let ours = ["CallTo", "To", "PhoneNumberSid"]
        .into_iter()
        .filter_map(|k| params.get(k))
        .filter(|n| n.chars().count() <= MAX_NUMBER_CHARS)
        .any(|n| Phone::parse(&n, region).is_ok_and(|p| state.alarm_watch.is_ours(&p)));
    if ours {
        Sender::Exotel
    } else {
        Sender::Stranger
    }
}
