//! `dingsync emulator [--listen ADDR]`: runs the DingTalk emulator on its own, for developing
//! against a stand-in (point `dingtalk.api_base` of another dingsync at it). Never a real
//! organisation: it serves the configured or its default test credentials only.

use std::process::ExitCode;

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
    let mut emulator_config = dingsync_emulator::EmulatorConfig {
        time_scale: settings.time_scale,
        seed: settings.effective_seed(),
        people: (settings.people_pace_ms > 0)
            .then(|| std::time::Duration::from_millis(settings.people_pace_ms)),
        ..Default::default()
    };
    if !config.dingtalk.corp_id.is_empty() {
        emulator_config.corp_id = config.dingtalk.corp_id.clone();
    }
    if !config.dingtalk.app_key.is_empty() && !config.dingtalk.app_secret.is_empty() {
        emulator_config.app_key = config.dingtalk.app_key.clone();
        emulator_config.app_secret = config.dingtalk.app_secret.expose().to_string();
    }
    println!(
        "DingTalk emulator on http://{listen} (corp_id {}, app_key {}); Ctrl-C stops it",
        emulator_config.corp_id, emulator_config.app_key
    );
    dingsync_emulator::serve(emulator_config, listen, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
