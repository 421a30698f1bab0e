//! Stream mode's one API call: `POST {openapi_base}/v1.0/gateway/connections/open`
//! (docs/dingtalk.md §8.1), which trades the app's AppKey and AppSecret for a WebSocket endpoint
//! and a ticket good for one connection within 90 s. It takes no access token.
//!
//! Metering: DingTalk meters the OA approval APIs (docs/dingtalk.md §7); opening a connection is
//! connection management, not an approval API, so we read it as not metered, like `gettoken`
//! (`quota::is_metered`). It is counted all the same, in the ledger under its own purpose
//! (`stream`) and in `dingsync_dingtalk_calls`, and it asks the allowance gate first like every
//! call, so that if DingTalk ever answers it with 90020 it is metered from then on. It does not
//! take a slot of the shared rate budget: that budget is the per-app API QPS, it lives in the
//! database (a connection must be able to open while the database is down, to answer `LATER`),
//! and opens are rare (one per connection, and reconnects back off).
//!
//! Owns: the request, the answer's reading, and what a refusal means. Does not own: the
//! WebSocket (`stream`).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Client, Error, Purpose, count_call};
use crate::config::{DingTalkConfig, Secret};

/// The path of the call (after `dingtalk.openapi_base`).
pub const OPEN_PATH: &str = "/v1.0/gateway/connections/open";
/// The same, as the allowance gate and the ledger name paths.
const OPEN_PATH_UNSLASHED: &str = super::quota::GATEWAY_OPEN;

/// What a connection is opened with.
pub struct Gateway {
    client: Client,
    url: String,
    app_key: String,
    app_secret: Secret,
}

/// Where to connect, and the ticket to connect with (a credential: `Debug` hides it).
#[derive(Clone)]
pub struct Ticket {
    pub endpoint: String,
    pub ticket: Secret,
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("endpoint", &self.endpoint)
            .field("ticket", &"***")
            .finish()
    }
}

impl Ticket {
    /// `endpoint?ticket=<url-encoded ticket>` (docs/dingtalk.md §8.1). Holds the ticket: never log it.
    pub fn connect_url(&self) -> Result<reqwest::Url, Error> {
        let mut url = reqwest::Url::parse(&self.endpoint)
            .map_err(|e| Error::Protocol(format!("gateway endpoint is not a URL: {e}")))?;
        if !matches!(url.scheme(), "wss" | "ws") {
            return Err(Error::Protocol(format!(
                "gateway endpoint is not a WebSocket URL (scheme {})",
                url.scheme()
            )));
        }
        url.query_pairs_mut()
            .append_pair("ticket", self.ticket.expose());
        Ok(url)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OpenRequest<'a> {
    client_id: &'a str,
    client_secret: &'a str,
    subscriptions: [Subscription; 1],
    ua: String,
    local_ip: &'a str,
}

#[derive(Serialize)]
struct Subscription {
    #[serde(rename = "type")]
    kind: &'static str,
    topic: &'static str,
}

#[derive(Deserialize)]
struct OpenAnswer {
    endpoint: String,
    ticket: String,
}

#[derive(Deserialize)]
struct V1Error {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

impl Gateway {
    /// The gateway of `openapi_base` (`dingtalk.openapi_base`, or the embedded emulator's URL),
    /// opened with the app's credentials; calls go through `client`'s HTTP client, gate and ledger.
    pub fn new(client: &Client, config: &DingTalkConfig, openapi_base: &str) -> Gateway {
        Gateway {
            client: client.clone(),
            url: format!("{}{OPEN_PATH}", openapi_base.trim_end_matches('/')),
            app_key: config.app_key.clone(),
            app_secret: config.app_secret.clone(),
        }
    }

    /// One attempt at a ticket (the caller backs off and retries). Subscribes to every event
    /// (`EVENT`, `*`): which ones arrive is chosen in DingTalk's console (docs/dingtalk.md §8.1).
    /// A 4xx answer is [`Error::Rejected`] with the HTTP status as `errcode` and DingTalk's code
    /// in `errmsg` (bad credentials: 400/401/403, e.g. `invalidClientIdOrSecret`).
    pub async fn open(&self) -> Result<Ticket, Error> {
        let inner = &self.client.inner;
        inner.gate.check(OPEN_PATH_UNSLASHED).await?;
        let body = OpenRequest {
            client_id: &self.app_key,
            client_secret: self.app_secret.expose(),
            subscriptions: [Subscription {
                kind: "EVENT",
                topic: "*",
            }],
            ua: format!("dingsync/{}", env!("CARGO_PKG_VERSION")),
            // Informational for DingTalk; we do not look up our own address.
            local_ip: "",
        };
        let sent = inner.http.post(&self.url).json(&body).send().await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                count_call(OPEN_PATH_UNSLASHED, None);
                if !e.is_connect() {
                    self.count();
                }
                return Err(Error::Transient(e.without_url().to_string()));
            }
        };
        self.count();
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .map_err(|e| Error::Transient(e.without_url().to_string()))?;
        count_call(OPEN_PATH_UNSLASHED, Some((status, &text)));
        match status {
            200..=299 => {
                let answer: OpenAnswer = serde_json::from_str(&text).map_err(|_| {
                    Error::Protocol("connections/open answered without endpoint and ticket".into())
                })?;
                Ok(Ticket {
                    endpoint: answer.endpoint,
                    ticket: Secret::new(answer.ticket),
                })
            }
            429 => Err(Error::RateLimited { errcode: 429 }),
            400..=499 => {
                let e: V1Error = serde_json::from_str(&text).unwrap_or(V1Error {
                    code: String::new(),
                    message: String::new(),
                });
                if e.code == super::quota::V1_QUOTA_CODE {
                    let reason = format!("{}: {}", e.code, e.message);
                    return Err(inner.gate.exhausted(OPEN_PATH_UNSLASHED, &reason).await);
                }
                if e.code.starts_with("Forbidden.AccessDenied.Qp") {
                    return Err(Error::RateLimited {
                        errcode: i64::from(status),
                    });
                }
                Err(Error::Rejected {
                    errcode: i64::from(status),
                    errmsg: if e.code.is_empty() {
                        format!("HTTP {status}")
                    } else {
                        e.message
                    },
                    code: (!e.code.is_empty()).then_some(e.code),
                })
            }
            _ => Err(Error::Transient(format!("HTTP {status}"))),
        }
    }

    fn count(&self) {
        let inner = &self.client.inner;
        inner.ledger.call(
            &inner.corp_id,
            OPEN_PATH_UNSLASHED,
            Purpose::Stream,
            inner.gate.is_metered(OPEN_PATH_UNSLASHED),
        );
    }
}

/// Whether a refusal of [`Gateway::open`] means the app's credentials are wrong.
pub fn is_bad_credentials(e: &Error) -> bool {
    matches!(
        e,
        Error::Rejected {
            errcode: 400 | 401 | 403,
            ..
        }
    )
}
