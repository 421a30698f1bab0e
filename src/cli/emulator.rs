//! `dingsync emulator [--listen ADDR]`: runs the DingTalk emulator on its own, for developing
//! against a stand-in (point `dingtalk.api_base` of another dingsync at it). Never a real
//! organisation: it serves the configured or its default test credentials only.

use std::process::ExitCode;

use dingsync_emulator::{Emulator, EmulatorConfig};

use crate::config::Config;

pub async fn command(
    config: &Config,
    listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<ExitCode> {
    crate::app::install_crypto_provider();
    let listen = match listen {
        Some(addr) => addr,
        None => config.emulator.listen.parse()?,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    let settings = &config.emulator;
    let mut emulator_config = EmulatorConfig {
        time_scale: settings.time_scale,
        seed: settings.effective_seed(),
        people: (settings.people_pace_ms > 0)
            .then(|| std::time::Duration::from_millis(settings.people_pace_ms)),
        admin_token: (!settings.admin_token.is_empty())
            .then(|| settings.admin_token.expose().to_string()),
        ..Default::default()
    };
    if !config.dingtalk.corp_id.is_empty() {
        emulator_config.corp_id = config.dingtalk.corp_id.clone();
    }
    if !config.dingtalk.app_key.is_empty() && !config.dingtalk.app_secret.is_empty() {
        emulator_config.app_key = config.dingtalk.app_key.clone();
        emulator_config.app_secret = config.dingtalk.app_secret.expose().to_string();
    }
    let (corp_id, app_key) = (
        emulator_config.corp_id.clone(),
        emulator_config.app_key.clone(),
    );
    let emulator = Emulator::start(emulator_config, listen).await?;
    println!(
        "DingTalk emulator on {} (corp_id {corp_id}, app_key {app_key}); Ctrl-C stops it",
        emulator.base_url()
    );
    if settings.admin_token.is_empty() {
        // Once, by design: the token was made for this run and is useless without being shown.
        println!("admin API token for this run: {}", emulator.admin_usage());
    } else {
        println!("admin API: send Authorization: Bearer <emulator.admin_token>");
    }
    shutdown.cancelled().await;
    emulator.stop().await;
    Ok(ExitCode::SUCCESS)
}
