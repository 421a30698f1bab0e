//! `dingsync emulator [--listen ADDR]`: runs the DingTalk emulator on its own, for developing
//! against a stand-in (point `dingtalk.api_base` of another dingsync at it). Never a real
//! organisation: it serves the configured or its default test credentials only, and refuses a
//! configuration whose `dingtalk.api_base` is a DingTalk other than a local stand-in (its keys
//! would be a real organisation's).

use std::{net::IpAddr, process::ExitCode};

use anyhow::bail;
use dingsync_emulator::{Emulator, EmulatorConfig};

use crate::config::Config;

pub async fn command(
    config: &Config,
    listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<ExitCode> {
    crate::app::install_crypto_provider();
    let base = &config.dingtalk.api_base;
    if !config.uses_emulator() && !is_local(base) {
        bail!(
            "dingtalk.api_base is {base}: this configuration is for a real organisation, and the emulator never runs with its secrets; run `dingsync emulator` with a configuration whose dingtalk.api_base is \"emulator\" or the emulator's own local URL (http://{})",
            config.emulator.listen
        );
    }
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
        monthly_calls: settings.monthly_calls,
        monthly_deliveries: settings.monthly_deliveries,
        delivery: if settings.delivery == "stream" {
            dingsync_emulator::Delivery::Stream
        } else {
            dingsync_emulator::Delivery::Http
        },
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

/// An http(s) URL whose host is this machine (a stand-in, not DingTalk).
fn is_local(url: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(url) else {
        return false;
    };
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::is_local;

    #[test]
    fn only_a_loopback_url_counts_as_a_local_stand_in() {
        for local in [
            "http://127.0.0.1:9090",
            "http://localhost:9090/",
            "http://[::1]:9090",
        ] {
            assert!(is_local(local), "{local}");
        }
        for remote in [
            "https://oapi.dingtalk.com",
            "http://10.0.0.5:9090",
            "http://127.0.0.1.example.com",
            "not a url",
        ] {
            assert!(!is_local(remote), "{remote}");
        }
    }
}
