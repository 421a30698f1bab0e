//! Fault knobs of the emulator: what can go wrong between a client and DingTalk, and between
//! DingTalk and the callback URL. Plain data (serde, so the admin API can read and replace it);
//! the decisions are taken where the faults apply (`api` for calls, `push` for deliveries), always
//! with the emulator's seeded RNG so that a run can be repeated.
//!
//! Owns: the knobs and the errors that can be injected. Does not own: applying them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Everything that can be made to go wrong. `Faults::default()` is a healthy DingTalk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every DingTalk API call (not to admin calls) before it is answered. DingTalk's
    /// gateway gives up after 3 s (docs/dingtalk.md §7), so more than 3000 makes a "slow DingTalk".
    pub latency_ms: u64,
    /// Probability (0..=1) that an API call is answered with an HTTP 502 from the gateway instead
    /// of DingTalk's JSON.
    pub http_5xx_rate: f64,
    /// Per-endpoint limit of calls per trailing second (`"topapi/processinstance/get"` → 20);
    /// `"*"` limits every endpoint separately. Calls over the limit get errcode 88 / sub_code
    /// 90002 (topapi), 90002 (oapi) or HTTP 403 `Forbidden.AccessDenied.QpsLimitForAppkeyAndApi`
    /// (v1.0), docs/dingtalk.md §7, §11.6. Rejected calls count too: DingTalk's counter
    /// sees every request. Empty = no limit (the default: real numbers are [UNCONFIRMED]).
    pub rate_limit_qps: BTreeMap<String, u32>,
    /// Errors queued for the next calls of an endpoint.
    pub inject: Vec<Injection>,
    /// The next N creates (`topapi/processinstance/create` or v1.0 `POST
    /// /v1.0/workflow/processInstances`) create the instance (it exists, its events are
    /// pushed) but the HTTP response is never sent: the request hangs until the client gives up
    /// (docs/dingtalk.md §9, item 3: timeout after committing).
    pub lose_create_response: u32,
    /// Probability (0..=1) that a create (either family) is committed but its response lost,
    /// as with `lose_create_response` (for load runs with a share of lost answers).
    pub lose_create_response_rate: f64,
    /// Faults of the HTTP pushes to the registered callback URL.
    pub push: PushFaults,
    /// API families whose approval calls the app has no permission for: `"legacy"`
    /// (`topapi/processinstance/*`: errcode 88, sub_code 60011 [UNCONFIRMED: DingTalk documents
    /// no number for it]) and `"v1"` (`v1.0/workflow/*`: HTTP 403
    /// `Forbidden.AccessDenied.AccessTokenPermissionDenied`, docs/dingtalk.md §11.7). Token and
    /// callback calls are not affected. Refused at the gateway, so not metered.
    pub denied_families: Vec<String>,
}

/// Faults of pushes. Probabilities are per event or per delivery attempt, as documented.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushFaults {
    /// Per attempt: the request is lost on the way (the receiver never sees it). DingTalk counts
    /// the attempt as failed, so the retry ladder (10 s, 30 s, failed list) applies.
    pub drop_rate: f64,
    /// Per attempt: the receiver gets the push and answers, but the answer is lost. DingTalk
    /// counts a failure and retries, so the receiver sees the event again (docs/dingtalk.md §6).
    pub lose_reply_rate: f64,
    /// Per event: DingTalk loses the event entirely: no push, no retry, not in the failed list.
    /// Only `listids` reconciliation can find what it was about.
    pub drop_forever_rate: f64,
    /// Per event: the event is delivered twice (two independent deliveries, docs/dingtalk.md §6).
    pub duplicate_rate: f64,
    /// Per event: the first attempt is held back by a random delay up to `reorder_max_ms`, so
    /// that later events overtake it (no ordering guarantee, docs/dingtalk.md §6).
    pub reorder_rate: f64,
    /// Upper bound of the reorder delay; 0 means 500 ms.
    pub reorder_max_ms: u64,
}

/// `count` errors for the next calls of `endpoint`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Injection {
    /// Path without the leading slash (`"gettoken"`, `"topapi/processinstance/create"`,
    /// `"call_back/get_call_back_failed_result"`; a v1.0 API by method and path, `"POST
    /// v1.0/workflow/processInstances"`), or `"*"` for any endpoint.
    pub endpoint: String,
    pub error: InjectedError,
    /// How many calls still get it.
    pub remaining: u32,
}

/// An error DingTalk can answer with. Rendered in the shape of the endpoint's family: topapi
/// wraps gateway errors in errcode 88 with a `sub_code`, classic oapi endpoints use the code itself
/// (docs/dingtalk.md §1.3, §7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum InjectedError {
    /// Call frequency over limit: topapi 88 + sub_code 90002, oapi 90002.
    RateLimit,
    /// Gateway / remote timeout: errcode 15, sub_code `isp.top-remote-connection-timeout`.
    GatewayTimeout,
    /// The access token is refused (without revoking it): topapi 88 + 40014, oapi 40014.
    TokenInvalid,
    /// DingTalk's generic "system busy", errcode -1.
    Busy,
    /// A v1.0 error verbatim: HTTP `status` with `{"code", "message"}` (docs/dingtalk.md §11.6).
    /// On an old-family endpoint it is answered as errcode `status`, errmsg `code: message`.
    V1 {
        status: u16,
        code: String,
        message: String,
    },
    /// Anything else, verbatim (e.g. a business error with a made-up errcode). On a v1.0
    /// endpoint: 90020 is the allowance's 403, any other an HTTP 400 whose code is `sub_code`
    /// (or the errcode as text).
    Custom {
        errcode: i64,
        #[serde(default)]
        sub_code: Option<String>,
        errmsg: String,
    },
}

impl Faults {
    /// Takes one injected error for `endpoint`, if any is queued (first match wins; used-up
    /// entries are removed).
    pub(crate) fn take_injection(&mut self, endpoint: &str) -> Option<InjectedError> {
        let index = self
            .inject
            .iter()
            .position(|i| i.remaining > 0 && (i.endpoint == endpoint || i.endpoint == "*"))?;
        let injection = &mut self.inject[index];
        injection.remaining -= 1;
        let error = injection.error.clone();
        if injection.remaining == 0 {
            self.inject.remove(index);
        }
        Some(error)
    }

    /// The QPS limit that applies to `endpoint`, if any.
    pub(crate) fn qps_limit(&self, endpoint: &str) -> Option<u32> {
        self.rate_limit_qps
            .get(endpoint)
            .or_else(|| self.rate_limit_qps.get("*"))
            .copied()
    }
}

/// A probability as `random_bool` accepts it: NaN and out-of-range values are clamped.
pub(crate) fn probability(p: f64) -> f64 {
    if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injections_are_used_up_in_order_and_removed() {
        let mut faults = Faults {
            inject: vec![
                Injection {
                    endpoint: "gettoken".into(),
                    error: InjectedError::Busy,
                    remaining: 1,
                },
                Injection {
                    endpoint: "*".into(),
                    error: InjectedError::RateLimit,
                    remaining: 2,
                },
            ],
            ..Faults::default()
        };
        assert_eq!(faults.take_injection("gettoken"), Some(InjectedError::Busy));
        assert_eq!(
            faults.take_injection("gettoken"),
            Some(InjectedError::RateLimit)
        );
        assert_eq!(
            faults.take_injection("topapi/processinstance/get"),
            Some(InjectedError::RateLimit)
        );
        assert_eq!(faults.take_injection("gettoken"), None);
        assert!(faults.inject.is_empty());
    }

    #[test]
    fn injected_errors_read_from_tagged_json() {
        let e: InjectedError = serde_json::from_str(
            r#"{"kind":"custom","errcode":40035,"errmsg":"formConverterError"}"#,
        )
        .unwrap();
        assert_eq!(
            e,
            InjectedError::Custom {
                errcode: 40035,
                sub_code: None,
                errmsg: "formConverterError".into()
            }
        );
    }
}
