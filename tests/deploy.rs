//! The deployment kit in `deploy/`: the systemd unit passes `systemd-analyze verify` and keeps its
//! hardening, the environment file lists every secret the daemon reads, the Prometheus rules pass
//! `promtool check rules` and their own `promtool test rules`, and the rules and the Grafana
//! dashboard name only series the daemon exports (or recording rules the rules file defines).
//! The tools are required: a machine without them fails these tests, naming the package that
//! brings them (`.ci/run` installs both).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs `tool` with `args` in `dir`; a tool that is not installed fails the test with the Debian
/// package that provides it.
fn run(tool: &str, package: &str, args: &[&str], dir: &Path) -> Output {
    Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{tool} could not be run ({e}): install the Debian package `{package}` \
                 (apt-get install -y {package}; .ci/run does)"
            )
        })
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// A scratch directory of this test binary's own, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("deploy")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const UNIT: &str = "deploy/dingsync.service";
const INSTALLED_BINARY: &str = "/usr/local/bin/dingsync";

/// The unit as shipped, with ExecStart pointing at the binary cargo built (systemd-analyze
/// refuses a unit whose command does not exist), written as `dingsync.service` in `dir`.
fn unit_copy(dir: &Path, unit: &str) -> PathBuf {
    assert!(
        unit.contains(&format!("ExecStart={INSTALLED_BINARY} ")),
        "{UNIT}: ExecStart must start the daemon from {INSTALLED_BINARY}"
    );
    let copy = dir.join("dingsync.service");
    std::fs::write(
        &copy,
        unit.replace(INSTALLED_BINARY, env!("CARGO_BIN_EXE_dingsync")),
    )
    .unwrap();
    copy
}

/// What `systemd-analyze verify` says about `unit` (in `dir`): exit code and the lines naming it.
fn verify(dir: &Path, unit: &str) -> (bool, Vec<String>) {
    let copy = unit_copy(dir, unit);
    let out = run(
        "systemd-analyze",
        "systemd",
        &["verify", copy.to_str().unwrap()],
        dir,
    );
    // verify exits 0 on unknown keys and unparsable values, and only says so on stderr; lines
    // about other units of the machine (a broken unit elsewhere) are not this file's problem.
    let complaints = text(&out.stderr)
        .lines()
        .chain(text(&out.stdout).lines())
        .filter(|line| line.contains("dingsync.service"))
        .map(str::to_string)
        .collect();
    (out.status.success(), complaints)
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let dir = scratch("verify");
    let (ok, complaints) = verify(&dir, &read(UNIT));
    assert!(
        ok && complaints.is_empty(),
        "systemd-analyze verify {UNIT}: exit ok = {ok}, complaints:\n{}",
        complaints.join("\n")
    );
}

#[test]
fn systemd_analyze_verify_as_run_here_catches_a_misspelt_directive() {
    let dir = scratch("verify-broken");
    let broken = read(UNIT).replace("ProtectSystem=strict", "ProtectSystem=strickt");
    let (_, complaints) = verify(&dir, &broken);
    assert!(
        complaints.iter().any(|line| line.contains("strickt")),
        "a broken unit went unnoticed: {complaints:?}"
    );
}

/// `key=value` lines of the unit (comments and section headers left out), in order.
fn directives(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn seconds(value: &str) -> f64 {
    let value = value.trim();
    if let Some(s) = value.strip_suffix("min") {
        s.parse::<f64>().unwrap() * 60.0
    } else if let Some(ms) = value.strip_suffix("ms") {
        ms.parse::<f64>().unwrap() / 1000.0
    } else {
        value.trim_end_matches('s').parse().unwrap()
    }
}

#[test]
fn systemd_unit_keeps_its_hardening_and_lifecycle_settings() {
    let unit = read(UNIT);
    let lines = directives(&unit);
    let get = |key: &str| -> Vec<&str> {
        lines
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("User", "dingsync"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
        ("SystemCallArchitectures", "native"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("Restart", "on-failure"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("EnvironmentFile", "/etc/dingsync/dingsync.env"),
        (
            "ExecStart",
            "/usr/local/bin/dingsync serve --config /etc/dingsync/config.toml",
        ),
    ] {
        assert!(
            get(key).contains(&value),
            "{UNIT}: expected {key}={value}, found {:?}",
            get(key)
        );
    }
    // A crash loop must end in `failed`: a start limit that can be reached, not restarts for ever.
    let burst: u32 = get("StartLimitBurst")[0].parse().unwrap();
    let interval = seconds(get("StartLimitIntervalSec")[0]);
    let restart_sec = seconds(get("RestartSec")[0]);
    assert!(burst >= 1 && interval > 0.0, "StartLimitBurst/IntervalSec");
    assert!(
        f64::from(burst) * restart_sec < interval,
        "{burst} restarts {restart_sec} s apart never reach the start limit of {interval} s"
    );
    // systemd must wait out the daemon's own graceful shutdown before SIGKILL.
    let config: toml::Table = read("config.toml").parse().unwrap();
    let shutdown_ms = config["server"]["shutdown_timeout_ms"]
        .as_integer()
        .unwrap() as f64;
    let stop = seconds(get("TimeoutStopSec")[0]);
    assert!(
        stop * 1000.0 > shutdown_ms,
        "TimeoutStopSec={stop} s is not above server.shutdown_timeout_ms={shutdown_ms}"
    );
}

#[test]
fn systemd_unit_exposure_stays_low_by_systemd_analyze_security() {
    let dir = scratch("security");
    let copy = unit_copy(&dir, &read(UNIT));
    let out = run(
        "systemd-analyze",
        "systemd",
        &["security", "--offline=true", copy.to_str().unwrap()],
        &dir,
    );
    let report = text(&out.stdout);
    let level: f64 = report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for dingsync.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}\n{}", text(&out.stderr)));
    println!("systemd-analyze security: exposure {level}");
    assert!(level <= 2.0, "exposure {level} above 2.0:\n{report}");
}

/// `(section, key)` of every field of type `Secret` in `src/config.rs`: the section is the
/// `Config` field whose struct declares it.
fn secret_keys() -> BTreeSet<(String, String)> {
    let source = read("src/config.rs");
    let mut sections = Vec::new(); // (struct name, section)
    let config = source
        .split("pub struct Config {")
        .nth(1)
        .unwrap()
        .split('}')
        .next()
        .unwrap();
    for line in config.lines().map(str::trim) {
        // Doc comments are not fields; `apps` is a list whose secrets are named per app
        // (DINGSYNC_APPS_<NAME>_<KEY>, shown commented in the example).
        if line.starts_with("//") {
            continue;
        }
        if let Some((field, ty)) = line.trim_end_matches(',').split_once(": ")
            && !ty.starts_with("Vec<")
        {
            sections.push((ty.to_string(), field.trim_start_matches("pub ").to_string()));
        }
    }
    let mut keys = BTreeSet::new();
    for (ty, section) in sections {
        let body = source
            .split(&format!("pub struct {ty} {{"))
            .nth(1)
            .unwrap_or_else(|| panic!("struct {ty} not found in src/config.rs"))
            .split("\n}")
            .next()
            .unwrap();
        for line in body.lines() {
            if let Some(field) = line
                .trim()
                .strip_prefix("pub ")
                .and_then(|l| l.strip_suffix(": Secret,"))
            {
                keys.insert((section.clone(), field.to_string()));
            }
        }
    }
    keys
}

fn env_example() -> Vec<(String, String)> {
    read("deploy/dingsync.env.example")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=value lines");
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn env_example_lists_every_secret_the_daemon_reads_and_nothing_else() {
    let secrets = secret_keys();
    assert!(secrets.len() >= 5, "parsed secrets: {secrets:?}");
    let wanted: BTreeSet<String> = secrets
        .iter()
        .map(|(s, k)| format!("DINGSYNC_{}_{}", s.to_uppercase(), k.to_uppercase()))
        .collect();
    let listed: BTreeSet<String> = env_example().into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        listed, wanted,
        "deploy/dingsync.env.example against the Secret fields of src/config.rs"
    );
}

#[test]
fn env_example_filled_in_loads_over_the_shipped_config_for_a_real_organisation() {
    let mut env: Vec<(String, String)> = env_example()
        .into_iter()
        .map(|(k, v)| {
            let v = match k.as_str() {
                "DINGSYNC_DINGTALK_APP_SECRET" => "RealAppSecretValue".to_string(),
                "DINGSYNC_CALLBACK_TOKEN" => "tok123".to_string(),
                "DINGSYNC_CALLBACK_AES_KEY" => "a".repeat(43),
                _ => v,
            };
            (k, v)
        })
        .collect();
    for (k, v) in [
        ("DINGSYNC_DINGTALK_API_BASE", "https://oapi.dingtalk.com"),
        ("DINGSYNC_DINGTALK_APP_KEY", "dingappkey"),
        ("DINGSYNC_DINGTALK_CORP_ID", "dingcorp"),
        ("DINGSYNC_CALLBACK_OWNER_KEY", "dingcorp"),
    ] {
        env.push((k.to_string(), v.to_string()));
    }
    let config = dingsync::config::Config::from_sources(&read("config.toml"), "config.toml", env)
        .unwrap_or_else(|e| panic!("the example environment does not load: {e}"));
    assert_eq!(
        config.database.url.expose(),
        "postgres://dingsync:CHANGE-ME@127.0.0.1:5432/dingsync"
    );
    assert_eq!(config.dingtalk.app_secret.expose(), "RealAppSecretValue");
}

const RULES_DIR: &str = "deploy/prometheus";

#[test]
fn prometheus_rules_pass_promtool_check_rules() {
    let out = run(
        "promtool",
        "prometheus",
        &["check", "rules", "dingsync.rules.yml"],
        &repo().join(RULES_DIR),
    );
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn prometheus_rules_pass_their_promtool_unit_tests() {
    let out = run(
        "promtool",
        "prometheus",
        &["test", "rules", "dingsync.rules.test.yml"],
        &repo().join(RULES_DIR),
    );
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && said.contains("SUCCESS"),
        "promtool test rules:\n{said}"
    );
}

/// The names after `- alert:` / `- record:` in the rules file.
fn rule_names(kind: &str) -> Vec<String> {
    read("deploy/prometheus/dingsync.rules.yml")
        .lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("- {kind}: ")))
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn every_alert_has_a_test_where_it_fires_and_one_where_it_stays_quiet() {
    let tests = read("deploy/prometheus/dingsync.rules.test.yml");
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = line.strip_prefix("alertname: ") {
            match lines.get(i + 1) {
                Some(&"exp_alerts: []") => quiet.insert(name.to_string()),
                Some(&"exp_alerts:") => fires.insert(name.to_string()),
                other => panic!("alertname {name} followed by {other:?}"),
            };
        }
    }
    let alerts = rule_names("alert");
    assert!(alerts.len() >= 10, "alerts: {alerts:?}");
    for alert in alerts {
        assert!(fires.contains(&alert), "{alert}: no test where it fires");
        assert!(
            quiet.contains(&alert),
            "{alert}: no test where it stays quiet"
        );
    }
}

/// Every series name the daemon exports, as Prometheus stores it: the names registered in
/// `src/metrics.rs`, each with the suffixes of its type as the README's metrics table gives it
/// (`_total` for counters; `_bucket`, `_sum`, `_count` for histograms). Fails when the two
/// disagree, so the README table stays true too.
fn exported_series() -> BTreeSet<String> {
    let source = read("src/metrics.rs");
    let registered: BTreeSet<String> = source
        .split("register(")
        .skip(1)
        .filter_map(|rest| {
            let name = rest.trim_start().strip_prefix('"')?.split('"').next()?;
            name.starts_with("dingsync_").then(|| name.to_string())
        })
        .collect();
    assert!(registered.len() >= 20, "registered: {registered:?}");
    let readme = read("README.md");
    let mut exported = BTreeSet::new();
    for name in &registered {
        let counter = format!("| `{name}_total` |");
        let plain = format!("| `{name}` |");
        if readme.contains(&counter) {
            exported.insert(format!("{name}_total"));
        } else if let Some(row) = readme.lines().find(|l| l.starts_with(&plain)) {
            if row.contains("histogram") {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{suffix}"));
                }
            } else {
                exported.insert(name.clone());
            }
        } else {
            panic!(
                "{name} is registered in src/metrics.rs but missing from README's metrics table"
            );
        }
    }
    exported
}

/// The `dingsync_*` and `dingsync:*` names in a PromQL expression (a bare `dingsync`, e.g. the
/// job's label value, is not a series).
fn series_in(expr: &str) -> Vec<String> {
    let in_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    expr.split(|c: char| !in_name(c))
        .filter(|word| word.starts_with("dingsync") && word.len() > "dingsync".len())
        .map(str::to_string)
        .collect()
}

/// The expressions of the rules file (`expr:` values, block scalars included).
fn rule_expressions() -> Vec<String> {
    let rules = read("deploy/prometheus/dingsync.rules.yml");
    let mut exprs = Vec::new();
    let mut block: Option<(usize, String)> = None;
    for line in rules.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some((depth, text)) = block.as_mut() {
            if line.trim().is_empty() || indent > *depth {
                text.push_str(line);
                text.push('\n');
                continue;
            }
            exprs.push(block.take().unwrap().1);
        }
        if let Some(value) = line.trim().strip_prefix("expr: ") {
            if value.trim() == "|" {
                block = Some((indent, String::new()));
            } else {
                exprs.push(value.to_string());
            }
        }
    }
    exprs.extend(block.map(|(_, text)| text));
    exprs
}

#[test]
fn rules_and_dashboard_name_only_series_the_daemon_exports() {
    let exported = exported_series();
    let recorded: BTreeSet<String> = rule_names("record").into_iter().collect();
    assert!(recorded.len() >= 10, "recording rules: {recorded:?}");
    let known = |name: &str| exported.contains(name) || recorded.contains(name);

    let exprs = rule_expressions();
    assert!(exprs.len() >= 30, "rule expressions: {}", exprs.len());
    for expr in &exprs {
        for name in series_in(expr) {
            assert!(
                known(&name),
                "rules file: {name} is not exported (in {expr})"
            );
        }
    }

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dingsync.json")).expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut used = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            let names = series_in(expr);
            assert!(
                !names.is_empty(),
                "panel {title}: {expr} names no dingsync series"
            );
            for name in names {
                assert!(
                    known(&name),
                    "dashboard panel {title}: {name} is not exported"
                );
                used.insert(name);
            }
        }
    }
    // The concerns the dashboard must show.
    for needed in [
        "dingsync:events_accepted:rate5m",
        "dingsync:callback_events:rate5m",
        "dingsync:callback_ack_seconds:p99_5m",
        "dingsync_outbox_rows",
        "dingsync_allowance_used",
        "dingsync_allowance_limit",
        "dingsync_allowance_forecast",
        "dingsync_access_token_valid_seconds",
        "dingsync_stream_connections",
        "dingsync:drift_repaired:increase1h",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
}
