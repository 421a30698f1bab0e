//! The app registry: `[[apps]]`, several DingTalk apps (one per organisation) served by one
//! deployment, and [`AppSettings`], the one per-app context the rest of the daemon receives
//! (credentials, callback secrets, API family, rate, allowances, delivery). Without `[[apps]]`
//! the single-app form (`[dingtalk]`, `[callback]`, `[stream]`) is the one app, named
//! [`DEFAULT_APP`].
//!
//! Owns: the entries' keys, their secrets (from the file, `DINGSYNC_APPS_<NAME>_<KEY>`, or a
//! `*_file`), their rules and the errors naming `apps[i].key`. Does not own what an app's
//! settings are used for (`app` wires one set of workers per app).
//!
//! Why the configuration and not a table: an app's secrets must never be in the database (a
//! business app's role reads it; backups copy it), and the daemon's start-up is the one place
//! where a mistake can be refused before anything runs. Adding an organisation is a deploy step
//! (its callback URL is registered at DingTalk with the app's own secrets) like changing any key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    ApiFamily, CallbackConfig, Config, ConfigError, DINGTALK_API, DINGTALK_API_V1, DingTalkConfig,
    EMULATOR, MIN_MONTHLY_CALLS, Secret, StreamConfig, invalid, string_or_list,
};
use crate::crypto::CallbackCrypto;

/// The name of the one app of the single-app form (`[dingtalk]`, `[callback]`): its callback
/// path is `/dingtalk/callback` (and `/dingtalk/callback/default`).
pub const DEFAULT_APP: &str = "default";

/// One `[[apps]]` entry as written. Keys left out take the global `[dingtalk]` value (`api_base`,
/// `openapi_base`, `api_family`, `qps`, the monthly allowances); credentials and callback secrets
/// are the app's own and never inherited.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppEntry {
    /// In callback paths (`/dingtalk/callback/{name}`), logs and environment names: 1 to 32 of
    /// a-z, 0-9, `_`, starting with a letter.
    pub name: String,
    pub app_key: String,
    pub app_secret: Secret,
    /// A file holding the app secret (e.g. a mounted secret); instead of `app_secret`.
    pub app_secret_file: String,
    pub corp_id: String,
    pub token: Secret,
    pub token_file: String,
    pub aes_key: Secret,
    pub aes_key_file: String,
    /// Accepted owner keys; empty: the app's CorpId and AppKey.
    #[serde(deserialize_with = "string_or_list")]
    pub owner_key: Vec<String>,
    pub public_url: String,
    pub api_base: String,
    pub openapi_base: String,
    pub api_family: Option<ApiFamily>,
    pub qps: Option<u32>,
    pub monthly_calls: Option<u64>,
    pub monthly_deliveries: Option<u64>,
    pub stream: AppStream,
}

/// `apps[i].stream`: whether this app's events arrive over Stream (the connection count and
/// silence limit are the global `[stream]` ones).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppStream {
    pub enabled: bool,
}

/// One app as the daemon runs it, resolved: the single-app form's sections, or an `[[apps]]`
/// entry over the global defaults with its secrets read. Every consumer of an app's settings
/// receives this (or a part of it), never `Config::dingtalk` directly.
#[derive(Debug, Clone)]
pub struct AppSettings {
    pub name: String,
    pub dingtalk: DingTalkConfig,
    pub callback: CallbackConfig,
    pub stream: StreamConfig,
    /// Whether it came from `[[apps]]`: then the organisation of its events is its corp_id
    /// only (`store::corps::Served::only`); the single-app form keeps serving every
    /// organisation in `dingsync.corps`, as before.
    pub registered: bool,
}

impl AppSettings {
    pub fn corp_id(&self) -> &str {
        &self.dingtalk.corp_id
    }

    /// Whether the app can call DingTalk (credentials, or the embedded emulator's).
    pub fn has_credentials(&self) -> bool {
        !(self.dingtalk.app_key.is_empty() || self.dingtalk.app_secret.is_empty())
    }
}

/// The keys an environment variable `DINGSYNC_APPS_<NAME>_<KEY>` may set, and whether each is a
/// number (else a string; `owner_key` a comma-separated list; `stream_enabled` a boolean).
const ENV_KEYS: [(&str, EnvKind); 17] = [
    ("app_key", EnvKind::Text),
    ("app_secret", EnvKind::Text),
    ("app_secret_file", EnvKind::Text),
    ("corp_id", EnvKind::Text),
    ("token", EnvKind::Text),
    ("token_file", EnvKind::Text),
    ("aes_key", EnvKind::Text),
    ("aes_key_file", EnvKind::Text),
    ("owner_key", EnvKind::List),
    ("public_url", EnvKind::Text),
    ("api_base", EnvKind::Text),
    ("openapi_base", EnvKind::Text),
    ("api_family", EnvKind::Text),
    ("qps", EnvKind::Number),
    ("monthly_calls", EnvKind::Number),
    ("monthly_deliveries", EnvKind::Number),
    ("stream_enabled", EnvKind::Bool),
];

#[derive(Clone, Copy)]
enum EnvKind {
    Text,
    List,
    Number,
    Bool,
}

/// Applies one `DINGSYNC_APPS_<NAME>_<KEY>` (`rest` is `<name>_<key>`, lower-cased) to the entry
/// of that name in the file. An entry is never created from the environment: a typo in the name
/// would otherwise run an app nobody configured.
pub(super) fn apply_env(
    table: &mut toml::Table,
    rest: &str,
    value: String,
    env_name: &str,
) -> Result<(), ConfigError> {
    let Some(entries) = table.get_mut("apps").and_then(toml::Value::as_array_mut) else {
        return Err(invalid(env_name, "there is no [[apps]] entry in the file"));
    };
    // The longest name that prefixes `rest`: names may hold `_` themselves.
    let mut found: Option<(usize, usize)> = None;
    for (i, entry) in entries.iter().enumerate() {
        let Some(name) = entry.get("name").and_then(toml::Value::as_str) else {
            continue;
        };
        let prefix = format!("{}_", name.to_ascii_lowercase());
        if rest.starts_with(&prefix) && found.is_none_or(|(_, len)| prefix.len() > len) {
            found = Some((i, prefix.len()));
        }
    }
    let Some((i, len)) = found else {
        return Err(invalid(
            env_name,
            "names no [[apps]] entry (DINGSYNC_APPS_<NAME>_<KEY>, NAME as apps[i].name upper-cased)",
        ));
    };
    let key = &rest[len..];
    let Some((_, kind)) = ENV_KEYS.iter().find(|(k, _)| *k == key) else {
        return Err(invalid(
            env_name,
            format!("there is no key apps[{i}].{key} settable from the environment"),
        ));
    };
    let dotted = format!("apps[{i}].{key} (from {env_name})");
    let parsed = match kind {
        EnvKind::Text => toml::Value::String(value),
        EnvKind::List => toml::Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
        EnvKind::Number => toml::Value::Integer(
            value
                .trim()
                .parse()
                .map_err(|_| invalid(&dotted, "must be a whole number"))?,
        ),
        EnvKind::Bool => toml::Value::Boolean(
            value
                .trim()
                .parse()
                .map_err(|_| invalid(&dotted, "must be true or false"))?,
        ),
    };
    let Some(entry) = entries[i].as_table_mut() else {
        return Err(invalid(&format!("apps[{i}]"), "must be a table"));
    };
    if key == "stream_enabled" {
        let stream = entry
            .entry("stream")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match stream.as_table_mut() {
            Some(stream) => {
                stream.insert("enabled".into(), parsed);
            }
            None => return Err(invalid(&format!("apps[{i}].stream"), "must be a table")),
        }
    } else {
        entry.insert(key.to_string(), parsed);
    }
    Ok(())
}

/// A negative allowance in an entry, named (read into an unsigned field serde's message would
/// not say what the key means).
pub(super) fn check_monthly_signs(table: &toml::Table) -> Result<(), ConfigError> {
    let Some(entries) = table.get("apps").and_then(toml::Value::as_array) else {
        return Ok(());
    };
    for (i, entry) in entries.iter().enumerate() {
        for key in super::MONTHLY_KEYS {
            if let Some(value) = entry.get(key).and_then(toml::Value::as_integer)
                && value < 0
            {
                return Err(invalid(
                    &format!("apps[{i}].{key}"),
                    format!("is {value}: must be 0 (unmetered) or a positive number per month"),
                ));
            }
        }
    }
    Ok(())
}

/// A secret given inline or in a file (one, not both); a file's trailing newline is not part of it.
fn secret(inline: &Secret, file: &str, key: &str, required: bool) -> Result<Secret, ConfigError> {
    match (inline.is_empty(), file.is_empty()) {
        (false, false) => Err(invalid(key, format!("set {key} or {key}_file, not both"))),
        (false, true) => Ok(inline.clone()),
        (true, false) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| invalid(&format!("{key}_file"), format!("cannot read {file}: {e}")))?;
            let value = text.trim_end_matches(['\n', '\r']);
            if value.is_empty() {
                return Err(invalid(&format!("{key}_file"), format!("{file} is empty")));
            }
            Ok(Secret::new(value))
        }
        (true, true) if required => Err(invalid(
            key,
            format!(
                "required (or {key}_file, or the environment: DINGSYNC_APPS_<NAME>_{})",
                key.rsplit('.').next().unwrap_or(key).to_ascii_uppercase()
            ),
        )),
        (true, true) => Ok(Secret::default()),
    }
}

fn identifier_ok(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Config {
    /// The apps this deployment serves, resolved (secrets read from their files): the
    /// `[[apps]]` entries, or the single-app form as the one app [`DEFAULT_APP`]. Errors name
    /// the key (`apps[1].corp_id`); `apps[0]` is the first entry.
    pub fn apps(&self) -> Result<Vec<AppSettings>, ConfigError> {
        if self.apps.is_empty() {
            return Ok(vec![AppSettings {
                name: DEFAULT_APP.into(),
                dingtalk: self.dingtalk.clone(),
                callback: self.callback.clone(),
                stream: self.stream.clone(),
                registered: false,
            }]);
        }
        self.apps
            .iter()
            .enumerate()
            .map(|(i, entry)| self.resolve(i, entry))
            .collect()
    }

    /// The configuration as the single-app form of one app, for an operator command (`--app`):
    /// `name`, or the only app when `None`. With several apps and no name, the error lists them.
    pub fn for_app(&self, name: Option<&str>) -> Result<Config, ConfigError> {
        let apps = self.apps()?;
        let chosen = match name {
            Some(name) => apps.into_iter().find(|a| a.name == name),
            None if apps.len() == 1 => apps.into_iter().next(),
            None => {
                let names: Vec<String> = apps.into_iter().map(|a| a.name).collect();
                return Err(invalid(
                    "--app",
                    format!(
                        "several apps are configured ({}): name one",
                        names.join(", ")
                    ),
                ));
            }
        };
        let Some(app) = chosen else {
            return Err(invalid(
                "--app",
                format!(
                    "{:?} is not the name of a configured app",
                    name.unwrap_or_default()
                ),
            ));
        };
        let mut config = self.clone();
        config.dingtalk = app.dingtalk;
        config.callback = app.callback;
        config.stream = app.stream;
        config.apps = Vec::new();
        Ok(config)
    }

    fn resolve(&self, i: usize, e: &AppEntry) -> Result<AppSettings, ConfigError> {
        let key = |k: &str| format!("apps[{i}].{k}");
        let g = &self.dingtalk;
        let stream_only = e.stream.enabled
            && e.token.is_empty()
            && e.token_file.is_empty()
            && e.aes_key.is_empty()
            && e.aes_key_file.is_empty();
        let app_secret = secret(&e.app_secret, &e.app_secret_file, &key("app_secret"), true)?;
        let token = secret(&e.token, &e.token_file, &key("token"), !stream_only)?;
        let aes_key = secret(&e.aes_key, &e.aes_key_file, &key("aes_key"), !stream_only)?;
        let api_base = if e.api_base.is_empty() {
            g.api_base.clone()
        } else {
            e.api_base.clone()
        };
        // An app at its own address does not take the global v1.0 address along with it.
        let openapi_base = if e.openapi_base.is_empty() && e.api_base.is_empty() {
            g.openapi_base.clone()
        } else {
            e.openapi_base.clone()
        };
        let owner_key = if e.owner_key.is_empty() {
            [&e.corp_id, &e.app_key]
                .into_iter()
                .filter(|k| !k.is_empty())
                .cloned()
                .collect()
        } else {
            e.owner_key.clone()
        };
        Ok(AppSettings {
            name: e.name.clone(),
            dingtalk: DingTalkConfig {
                api_base,
                openapi_base,
                app_key: e.app_key.clone(),
                app_secret,
                corp_id: e.corp_id.clone(),
                timeout_ms: g.timeout_ms,
                qps: e.qps.unwrap_or(g.qps),
                max_attempts: g.max_attempts,
                monthly_calls: e.monthly_calls.unwrap_or(g.monthly_calls),
                monthly_deliveries: e.monthly_deliveries.unwrap_or(g.monthly_deliveries),
                api_family: e.api_family.unwrap_or(g.api_family),
            },
            callback: CallbackConfig {
                token,
                aes_key,
                public_url: e.public_url.clone(),
                owner_key,
            },
            stream: StreamConfig {
                enabled: e.stream.enabled,
                ..self.stream.clone()
            },
            registered: true,
        })
    }

    /// The `[[apps]]` rules: nothing of an app in the single-app sections beside them, names
    /// that can be paths, no app or organisation twice, each app complete.
    pub(super) fn validate_apps(&self) -> Result<(), ConfigError> {
        if self.apps.is_empty() {
            return Ok(());
        }
        // One source per app: a key left in [dingtalk]/[callback] would be an app nobody runs,
        // or worse be taken for one of the entries'.
        if let Some(key) = self.real_organisation_keys().first() {
            return Err(invalid(
                key,
                "must be empty with [[apps]]: move the app's credentials and callback secrets into its [[apps]] entry",
            ));
        }
        if self.stream.enabled {
            return Err(invalid(
                "stream.enabled",
                "must be false with [[apps]]: set apps[i].stream.enabled for each app that uses Stream",
            ));
        }
        if self.uses_emulator() {
            return Err(invalid(
                "dingtalk.api_base",
                format!(
                    "is \"{EMULATOR}\" with [[apps]]: the embedded emulator is one organisation of its own; point each app at DingTalk ({DINGTALK_API}) or at a standalone `dingsync emulator` by its URL"
                ),
            ));
        }
        let mut names = BTreeMap::new();
        let mut app_keys = BTreeMap::new();
        let mut corps = BTreeMap::new();
        for (i, entry) in self.apps.iter().enumerate() {
            let key = |k: &str| format!("apps[{i}].{k}");
            if !identifier_ok(&entry.name) {
                return Err(invalid(
                    &key("name"),
                    "must be 1 to 32 of a-z, 0-9 and _, starting with a letter (it is a path segment and a metrics label)",
                ));
            }
            if let Some(j) = names.insert(entry.name.clone(), i) {
                return Err(invalid(
                    &key("name"),
                    format!("{:?} is also apps[{j}].name", entry.name),
                ));
            }
            if entry.app_key.is_empty() {
                return Err(invalid(&key("app_key"), "required: the app's AppKey"));
            }
            if let Some(j) = app_keys.insert(entry.app_key.clone(), i) {
                return Err(invalid(
                    &key("app_key"),
                    format!("is also apps[{j}].app_key: the same app twice"),
                ));
            }
            if entry.corp_id.is_empty() {
                return Err(invalid(
                    &key("corp_id"),
                    "required: the organisation's CorpId (ding...)",
                ));
            }
            // Outbox and action rows name an organisation, not an app: two apps of one
            // organisation would both take its rows, and which one created an approval would
            // depend on timing.
            if let Some(j) = corps.insert(entry.corp_id.clone(), i) {
                return Err(invalid(
                    &key("corp_id"),
                    format!(
                        "is also apps[{j}].corp_id: one app per organisation (outbox and action rows name the organisation)"
                    ),
                ));
            }
            let app = self.resolve(i, entry)?;
            validate_app(i, &app, self.outbox.forecast_check)?;
        }
        Ok(())
    }
}

/// One resolved `[[apps]]` entry's own rules.
fn validate_app(i: usize, app: &AppSettings, forecast_check: bool) -> Result<(), ConfigError> {
    let key = |k: &str| format!("apps[{i}].{k}");
    let d = &app.dingtalk;
    let url_ok = |s: &str| s.starts_with("https://") || s.starts_with("http://");
    if d.api_base == EMULATOR {
        return Err(invalid(
            &key("api_base"),
            format!(
                "is \"{EMULATOR}\": the embedded emulator never runs with a real organisation's secrets; use a standalone `dingsync emulator` by its URL"
            ),
        ));
    }
    if d.api_base.is_empty() {
        return Err(invalid(
            &key("api_base"),
            format!("not set, nor dingtalk.api_base: set DingTalk's address ({DINGTALK_API})"),
        ));
    }
    if !url_ok(&d.api_base) {
        return Err(invalid(
            &key("api_base"),
            format!("must be an http(s) URL such as {DINGTALK_API}"),
        ));
    }
    if !d.openapi_base.is_empty() && !url_ok(&d.openapi_base) {
        return Err(invalid(
            &key("openapi_base"),
            format!("must be empty or an http(s) URL such as {DINGTALK_API_V1}"),
        ));
    }
    let least = MIN_MONTHLY_CALLS + u64::from(forecast_check);
    if d.monthly_calls != 0 && d.monthly_calls < least {
        return Err(invalid(
            &key("monthly_calls"),
            format!(
                "is {}, too few for one approval: set at least {least}, or 0 for an unmetered (paid) edition",
                d.monthly_calls
            ),
        ));
    }
    let c = &app.callback;
    let token = c.token.expose();
    let token_ok = token.len() <= 64 && token.bytes().all(|b| b.is_ascii_alphanumeric());
    if !token_ok {
        return Err(invalid(
            &key("token"),
            "must be 1 to 64 characters of A-Z, a-z, 0-9",
        ));
    }
    if !c.aes_key.is_empty() {
        CallbackCrypto::new("x", c.aes_key.expose())
            .map_err(|e| invalid(&key("aes_key"), e.to_string()))?;
    }
    if token.is_empty() != c.aes_key.is_empty() {
        return Err(invalid(
            &key(if token.is_empty() { "token" } else { "aes_key" }),
            "required beside the other callback secret (or neither, with stream.enabled alone)",
        ));
    }
    if c.owner_key.iter().any(|k| k.trim().is_empty()) {
        return Err(invalid(&key("owner_key"), "contains an empty entry"));
    }
    if !(c.public_url.is_empty() || url_ok(&c.public_url)) {
        return Err(invalid(
            &key("public_url"),
            format!(
                "must be an http(s) URL ending in /dingtalk/callback/{}",
                app.name
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"
[dingtalk]
api_base = "https://oapi.dingtalk.com"
qps = 20

[[apps]]
name = "acme"
app_key = "dingacmekey"
corp_id = "dingacme"
token = "acmetoken"
aes_key = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"

[[apps]]
name = "globex_cn"
app_key = "dingglobexkey"
corp_id = "dingglobex"
qps = 5
monthly_calls = 100
stream.enabled = true
"#;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_sources(
            text,
            "test.toml",
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    fn message(result: Result<Config, ConfigError>) -> String {
        result.expect_err("refused").to_string()
    }

    const SECRETS: [(&str, &str); 2] = [
        ("DINGSYNC_APPS_ACME_APP_SECRET", "acme-secret"),
        ("DINGSYNC_APPS_GLOBEX_CN_APP_SECRET", "globex-secret"),
    ];

    #[test]
    fn two_apps_take_their_secrets_from_the_environment_and_the_rest_from_the_defaults() {
        let config = load(TWO, &SECRETS).unwrap();
        let apps = config.apps().unwrap();
        assert_eq!(apps.len(), 2);
        let (acme, globex) = (&apps[0], &apps[1]);
        assert_eq!(acme.name, "acme");
        assert_eq!(acme.dingtalk.app_secret.expose(), "acme-secret");
        assert_eq!(acme.dingtalk.api_base, "https://oapi.dingtalk.com");
        assert_eq!(acme.dingtalk.qps, 20);
        assert_eq!(acme.callback.owner_key, ["dingacme", "dingacmekey"]);
        assert!(!acme.stream.enabled && acme.registered);
        assert_eq!(globex.dingtalk.app_secret.expose(), "globex-secret");
        assert_eq!(
            (globex.dingtalk.qps, globex.dingtalk.monthly_calls),
            (5, 100)
        );
        assert!(globex.stream.enabled);
        assert!(
            globex.callback.token.is_empty(),
            "Stream alone needs no callback secrets"
        );
        assert!(
            !format!("{apps:?}").contains("acme-secret"),
            "secrets print as stars"
        );
    }

    #[test]
    fn the_single_app_form_is_the_one_app_named_default() {
        let config = Config::default();
        let apps = config.apps().unwrap();
        assert_eq!(apps.len(), 1);
        assert_eq!(apps[0].name, DEFAULT_APP);
        assert!(!apps[0].registered);
    }

    #[test]
    fn a_missing_or_doubled_key_is_named_with_the_entrys_index() {
        assert!(message(load(TWO, &SECRETS[..1])).starts_with("apps[1].app_secret: required"));
        let no_corp = TWO.replace("corp_id = \"dingglobex\"\n", "");
        assert!(message(load(&no_corp, &SECRETS)).starts_with("apps[1].corp_id: required"));
        let same_name = TWO.replace("\"globex_cn\"", "\"acme\"");
        let err = message(load(&same_name, &SECRETS[..1]));
        assert!(
            err.starts_with("apps[1].name: \"acme\" is also apps[0].name"),
            "{err}"
        );
        let same_key = TWO.replace("dingglobexkey", "dingacmekey");
        assert!(message(load(&same_key, &SECRETS)).starts_with("apps[1].app_key: is also apps[0]"));
        let same_corp = TWO.replace("\"dingglobex\"", "\"dingacme\"");
        assert!(
            message(load(&same_corp, &SECRETS)).starts_with("apps[1].corp_id: is also apps[0]")
        );
        for bad in ["Acme", "1acme", "ac-me", ""] {
            let text = TWO.replace("\"acme\"", &format!("{bad:?}"));
            let err = message(load(&text, &SECRETS[1..]));
            assert!(err.starts_with("apps[0].name: must be"), "{bad}: {err}");
        }
        let bad_key = TWO.replace("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", "short");
        assert!(message(load(&bad_key, &SECRETS)).starts_with("apps[0].aes_key"));
        let negative = TWO.replace("monthly_calls = 100", "monthly_calls = -1");
        assert!(message(load(&negative, &SECRETS)).starts_with("apps[1].monthly_calls: is -1"));
    }

    #[test]
    fn a_secret_comes_from_a_file_but_never_from_both_a_file_and_the_value() {
        let dir = std::env::temp_dir().join(format!("dingsync-apps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("acme_secret");
        std::fs::write(&file, "from-a-file\n").unwrap();
        let text = TWO.replace(
            "name = \"acme\"",
            &format!(
                "name = \"acme\"\napp_secret_file = {:?}",
                file.display().to_string()
            ),
        );
        let config = load(&text, &SECRETS[1..]).unwrap();
        assert_eq!(
            config.apps().unwrap()[0].dingtalk.app_secret.expose(),
            "from-a-file"
        );
        let err = message(load(&text, &SECRETS));
        assert!(
            err.starts_with("apps[0].app_secret: set apps[0].app_secret or"),
            "{err}"
        );
        let missing = text.replace("acme_secret", "nothing_here");
        assert!(
            message(load(&missing, &SECRETS[1..]))
                .starts_with("apps[0].app_secret_file: cannot read")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn apps_beside_a_single_app_key_the_embedded_emulator_or_an_unknown_name_are_refused() {
        let beside = TWO.replace("qps = 20", "qps = 20\napp_key = \"x\"");
        assert!(
            message(load(&beside, &SECRETS))
                .starts_with("dingtalk.app_key: must be empty with [[apps]]")
        );
        let emulator = TWO.replace("\"https://oapi.dingtalk.com\"", "\"emulator\"");
        assert!(
            message(load(&emulator, &SECRETS))
                .starts_with("dingtalk.api_base: is \"emulator\" with [[apps]]")
        );
        let own = TWO.replace(
            "name = \"acme\"",
            "name = \"acme\"\napi_base = \"emulator\"",
        );
        assert!(message(load(&own, &SECRETS)).starts_with("apps[0].api_base: is \"emulator\""));
        let mut env = SECRETS.to_vec();
        env.push(("DINGSYNC_APPS_INITECH_APP_SECRET", "x"));
        let err = message(load(TWO, &env));
        assert!(
            err.starts_with("DINGSYNC_APPS_INITECH_APP_SECRET: names no [[apps]] entry"),
            "{err}"
        );
        env.pop();
        env.push(("DINGSYNC_APPS_ACME_COLOUR", "x"));
        assert!(message(load(TWO, &env)).contains("there is no key apps[0].colour"));
    }

    #[test]
    fn an_app_is_switched_to_stream_and_given_numbers_from_the_environment() {
        let mut env = SECRETS.to_vec();
        env.push(("DINGSYNC_APPS_ACME_STREAM_ENABLED", "true"));
        env.push(("DINGSYNC_APPS_ACME_MONTHLY_CALLS", "0"));
        let apps = load(TWO, &env).unwrap().apps().unwrap();
        assert!(apps[0].stream.enabled);
        assert_eq!(apps[0].dingtalk.monthly_calls, 0);
    }
}
