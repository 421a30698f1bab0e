//! Refused pushes in the log. Anyone who finds the callback URL can send requests to it, so one
//! WARN line per refusal would let them flood the log and bury the one line that matters. Instead,
//! within a [`WINDOW`], the first refusal of each kind is logged at WARN with its reason (what to
//! fix), and at the window's end one line sums the window up, e.g.
//! `refused 1,234 callbacks in the last 10 s: signature 1,200, malformed 34`. Each refusal is
//! still logged at DEBUG and counted in `dingsync_events_received_total` (`callback::track`).
//!
//! One window for the process: a task started by the first refusal of a quiet spell writes the
//! summaries and ends after a window without refusals.

use std::{
    fmt::Write,
    sync::{Mutex, PoisonError},
    time::Duration,
};

/// How long refusals are summed up before one line reports them.
pub const WINDOW: Duration = Duration::from_secs(10);

/// The refusals of the current window, per outcome label, in order of first appearance.
struct Window {
    open: bool,
    counts: Vec<(&'static str, u64)>,
}

static CURRENT: Mutex<Window> = Mutex::new(Window {
    open: false,
    counts: Vec::new(),
});

/// Counts one refusal (`outcome` is its `refused_*` label, `reason` what the log says: no
/// received key material, no decrypted bytes) and logs it as the module doc says.
pub fn record(outcome: &'static str, reason: &str) {
    tracing::debug!(outcome, reason, "callback refused");
    let (first_of_kind, opened) = {
        let mut window = CURRENT.lock().unwrap_or_else(PoisonError::into_inner);
        let opened = !window.open;
        window.open = true;
        let first = match window.counts.iter_mut().find(|(o, _)| *o == outcome) {
            Some((_, n)) => {
                *n += 1;
                false
            }
            None => {
                window.counts.push((outcome, 1));
                true
            }
        };
        (first, opened)
    };
    if first_of_kind {
        tracing::warn!(
            outcome,
            "callback refused: {reason} (further refusals are summed up every {} s)",
            WINDOW.as_secs()
        );
    }
    if opened {
        tokio::spawn(summarise());
    }
}

/// Writes one line per window while refusals keep coming; ends after a window without any.
async fn summarise() {
    loop {
        tokio::time::sleep(WINDOW).await;
        let counts = {
            let mut window = CURRENT.lock().unwrap_or_else(PoisonError::into_inner);
            let counts = std::mem::take(&mut window.counts);
            window.open = !counts.is_empty();
            counts
        };
        if counts.is_empty() {
            return;
        }
        // A window whose every refusal had a line of its own needs no summary.
        if counts.iter().any(|&(_, n)| n > 1) {
            tracing::warn!("{}", summary(&counts, WINDOW));
        }
    }
}

/// `refused 1,234 callbacks in the last 10 s: signature 1,200, malformed 34`.
fn summary(counts: &[(&'static str, u64)], window: Duration) -> String {
    let total: u64 = counts.iter().map(|&(_, n)| n).sum();
    let mut line = format!(
        "refused {} callback{} in the last {} s:",
        thousands(total),
        if total == 1 { "" } else { "s" },
        window.as_secs()
    );
    for (i, &(outcome, n)) in counts.iter().enumerate() {
        let kind = outcome.strip_prefix("refused_").unwrap_or(outcome);
        let separator = if i == 0 { " " } else { ", " };
        let _ = write!(
            line,
            "{separator}{} {}",
            kind.replace('_', " "),
            thousands(n)
        );
    }
    line
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_names_each_kind_with_its_count() {
        let counts = [("refused_signature", 1_200), ("refused_malformed", 34)];
        assert_eq!(
            summary(&counts, WINDOW),
            "refused 1,234 callbacks in the last 10 s: signature 1,200, malformed 34"
        );
        assert_eq!(
            summary(&[("refused_owner_key", 1)], WINDOW),
            "refused 1 callback in the last 10 s: owner key 1"
        );
    }

    #[test]
    fn thousands_are_separated_by_commas() {
        for (n, text) in [
            (0, "0"),
            (999, "999"),
            (1_000, "1,000"),
            (123_456, "123,456"),
            (1_234_567, "1,234,567"),
        ] {
            assert_eq!(thousands(n), text);
        }
    }
}
