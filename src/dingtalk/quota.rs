//! Which DingTalk calls count against the organisation's monthly allowance (docs/dingtalk.md §7).
//!
//! Metered: the OA approval APIs. Not metered: the token API (and SSO and contacts, which
//! dingsync does not call). The callback-management APIs (`call_back/*`, the failed-push list
//! included) are not on DingTalk's exempt list, so they are taken as metered: the stricter
//! reading.

/// Whether a call to `path` is metered.
pub fn is_metered(path: &str) -> bool {
    path.trim_start_matches('/') != "gettoken"
}
