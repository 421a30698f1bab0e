//! `dingsync callback register|show|update|delete`: the callback registration at DingTalk
//! (docs/dingtalk.md §3), made with the configured token, AES key and public URL. DingTalk checks the URL
//! with an encrypted `check_url` before it accepts a registration, so `serve` must already be
//! reachable there.

use std::process::ExitCode;

use anyhow::{Context, bail};

use super::CallbackCommand;
use crate::{
    callback::TAGS,
    config::Config,
    dingtalk::{self, Client, Purpose, types::CallbackRegistration},
    store,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Register,
    Show,
    Update,
    Delete,
}

/// Runs `action` against DingTalk; returns what to print.
pub async fn run(client: &Client, config: &Config, action: Action) -> anyhow::Result<String> {
    match action {
        Action::Register | Action::Update => {
            let registration = registration(config)?;
            let result = if action == Action::Register {
                client.register_callback(&registration).await
            } else {
                client.update_callback(&registration).await
            };
            result.map_err(|e| explain(e, &registration.url))?;
            Ok(format!(
                "callback {} at DingTalk: {} for {}",
                if action == Action::Register {
                    "registered"
                } else {
                    "updated"
                },
                registration.url,
                TAGS.join(", ")
            ))
        }
        Action::Show => {
            let current = client
                .get_callback(Purpose::Callback)
                .await
                .map_err(|e| explain(e, ""))?;
            let same = |ok: bool| {
                if ok {
                    "matches callback config"
                } else {
                    "DIFFERS from callback config"
                }
            };
            Ok(format!(
                "url:   {}\ntags:  {}\ntoken: *** ({})\naes_key: *** ({})",
                current.url,
                current.call_back_tag.join(", "),
                same(current.token == config.callback.token.expose()),
                same(current.aes_key == config.callback.aes_key.expose()),
            ))
        }
        Action::Delete => {
            client.delete_callback().await.map_err(|e| explain(e, ""))?;
            Ok("callback registration deleted at DingTalk".into())
        }
    }
}

fn registration(config: &Config) -> anyhow::Result<CallbackRegistration> {
    if config.callback.public_url.is_empty() {
        bail!(
            "callback.public_url: required to register (the https URL of POST /dingtalk/callback)"
        );
    }
    if config.callback.token.is_empty() || config.callback.aes_key.is_empty() {
        bail!("callback.token and callback.aes_key: required to register");
    }
    Ok(CallbackRegistration {
        call_back_tag: TAGS.iter().map(|t| t.to_string()).collect(),
        token: config.callback.token.expose().to_string(),
        aes_key: config.callback.aes_key.expose().to_string(),
        url: config.callback.public_url.clone(),
    })
}

/// DingTalk's callback errcodes (docs/dingtalk.md §3, §7) with what to do about them.
fn explain(e: dingtalk::Error, url: &str) -> anyhow::Error {
    let hint = match &e {
        dingtalk::Error::Rejected { errcode: 71006, .. } => {
            "a callback is already registered: use `dingsync callback update`".to_string()
        }
        dingtalk::Error::Rejected { errcode: 71007, .. } => {
            "no callback is registered: use `dingsync callback register`".to_string()
        }
        dingtalk::Error::Rejected { errcode: 71009, .. } => format!(
            "DingTalk's check_url to {url} did not get an encrypted `success`: is `dingsync serve` \
             reachable there with the same callback.token and callback.aes_key, and is your CorpId \
             in callback.owner_key?"
        ),
        _ => String::new(),
    };
    let e = anyhow::Error::new(e);
    if hint.is_empty() { e } else { e.context(hint) }
}

/// Checks the configuration needed to talk to DingTalk at all.
pub fn require_credentials(config: &Config) -> anyhow::Result<()> {
    if config.dingtalk.app_key.is_empty() || config.dingtalk.app_secret.is_empty() {
        bail!("dingtalk.app_key and dingtalk.app_secret: required to call DingTalk");
    }
    Ok(())
}

/// For the CLI: the client for `config`, against the configured DingTalk.
pub async fn client(config: &Config, pool: sqlx::PgPool) -> anyhow::Result<Client> {
    if config.uses_emulator() {
        bail!(
            "dingtalk.api_base: these commands manage a real DingTalk's callback; with \"emulator\" \
             `dingsync serve` registers its own callback with the embedded emulator"
        );
    }
    require_credentials(config)?;
    Client::new(pool, &config.dingtalk, &config.dingtalk.api_base)
        .context("building the DingTalk client")
}

pub async fn command(config: &Config, command: CallbackCommand) -> anyhow::Result<ExitCode> {
    let action = match command {
        CallbackCommand::Register => Action::Register,
        CallbackCommand::Show => Action::Show,
        CallbackCommand::Update => Action::Update,
        CallbackCommand::Delete => Action::Delete,
    };
    crate::app::install_crypto_provider();
    let pool = store::connect_and_migrate(&config.database).await?;
    let client = client(config, pool).await?;
    let done = run(&client, config, action).await;
    client.ledger().flush().await?;
    println!("{}", done?);
    Ok(ExitCode::SUCCESS)
}
