//! Time as DingTalk's allowances see it: calendar days and months in Beijing time (UTC+8, no
//! daylight saving; docs/dingtalk.md §7: the allowances are per calendar month, presumably in
//! Beijing time, the reading taken here), and the clock every pacing decision reads.
//!
//! [`Clock`] is real time in production. Against the emulator (and only there: `config` refuses
//! it otherwise) it may run faster by `emulator.time_scale`, the same factor the emulator's own
//! timings use, so that a month can be simulated in minutes: a clock that runs `1/scale` times
//! faster, and durations of that clock that last `scale` times as long in real time.
//!
//! Owns: Beijing days and months, the scaled clock. Pure; no I/O.

use std::time::Duration;

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, TimeZone, Utc};

/// UTC+8.
fn beijing() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).expect("a valid offset")
}

/// A time of the old API (and of a v1.0 answer read into its shape): `"yyyy-MM-dd HH:mm:ss"`
/// in Beijing time (docs/dingtalk.md §2.3); None for anything else.
pub fn parse_beijing(text: &str) -> Option<DateTime<Utc>> {
    let local = chrono::NaiveDateTime::parse_from_str(text.trim(), "%Y-%m-%d %H:%M:%S").ok()?;
    Some((local - chrono::Duration::hours(8)).and_utc())
}

/// The Beijing calendar day `t` falls on.
pub fn day(t: DateTime<Utc>) -> NaiveDate {
    t.with_timezone(&beijing()).date_naive()
}

/// The first day of the Beijing month `t` falls in.
pub fn month(t: DateTime<Utc>) -> NaiveDate {
    first_of_month(day(t))
}

/// The first day of `day`'s month.
pub fn first_of_month(day: NaiveDate) -> NaiveDate {
    day.with_day(1).expect("every month has a first day")
}

/// The first day of the month after `day`'s.
pub fn next_month(day: NaiveDate) -> NaiveDate {
    let first = first_of_month(day);
    let (y, m) = if first.month() == 12 {
        (first.year() + 1, 1)
    } else {
        (first.year(), first.month() + 1)
    };
    NaiveDate::from_ymd_opt(y, m, 1).expect("a valid month")
}

/// When Beijing `day` begins, in UTC.
pub fn start_of(day: NaiveDate) -> DateTime<Utc> {
    beijing()
        .from_local_datetime(&day.and_hms_opt(0, 0, 0).expect("midnight"))
        .single()
        .expect("a fixed offset has no gaps")
        .with_timezone(&Utc)
}

/// The span of the Beijing month `t` falls in: its start, and the start of the next one.
pub fn month_span(t: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let first = month(t);
    (start_of(first), start_of(next_month(first)))
}

/// How much of the month `t` falls in is still ahead, in days (fractional, > 0).
pub fn days_left(t: DateTime<Utc>) -> f64 {
    let (_, end) = month_span(t);
    ((end - t).num_milliseconds().max(1) as f64) / 86_400_000.0
}

/// The clock pacing decisions read. Cheap to copy.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Real seconds per clock second: 1 in production, `emulator.time_scale` against the emulator.
    scale: f64,
    /// When the clock was started, in real time and in clock time (the same instant).
    origin: DateTime<Utc>,
}

impl Clock {
    /// Real time.
    pub fn real() -> Clock {
        Clock {
            scale: 1.0,
            origin: Utc::now(),
        }
    }

    /// A clock that runs `1/scale` times faster than real time from now on (`scale` in (0, 1]).
    pub fn scaled(scale: f64) -> Clock {
        assert!(
            scale.is_finite() && scale > 0.0 && scale <= 1.0,
            "clock scale must be in (0, 1], got {scale}"
        );
        Clock {
            scale,
            origin: Utc::now(),
        }
    }

    /// Whether this is real time.
    pub fn is_real(&self) -> bool {
        self.scale == 1.0
    }

    /// Now, on this clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.at(Utc::now())
    }

    /// The clock's reading at real time `real`.
    pub fn at(&self, real: DateTime<Utc>) -> DateTime<Utc> {
        if self.scale == 1.0 {
            return real;
        }
        let elapsed = (real - self.origin).num_milliseconds() as f64 / self.scale;
        self.origin + chrono::TimeDelta::milliseconds(elapsed as i64)
    }

    /// How long `d` of this clock lasts in real time.
    pub fn real_duration(&self, d: Duration) -> Duration {
        d.mul_f64(self.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_beijing_month_starts_at_sixteen_hundred_utc_the_day_before() {
        let t = Utc.with_ymd_and_hms(2026, 11, 30, 16, 0, 0).unwrap();
        assert_eq!(day(t), NaiveDate::from_ymd_opt(2026, 12, 1).unwrap());
        assert_eq!(month(t), NaiveDate::from_ymd_opt(2026, 12, 1).unwrap());
        let just_before = t - chrono::TimeDelta::seconds(1);
        assert_eq!(
            month(just_before),
            NaiveDate::from_ymd_opt(2026, 11, 1).unwrap()
        );
        let (start, end) = month_span(t);
        assert_eq!(start, t);
        assert_eq!(end, Utc.with_ymd_and_hms(2026, 12, 31, 16, 0, 0).unwrap());
        assert!((days_left(t) - 31.0).abs() < 1e-9);
    }

    #[test]
    fn december_is_followed_by_january() {
        let dec = NaiveDate::from_ymd_opt(2026, 12, 17).unwrap();
        assert_eq!(
            next_month(dec),
            NaiveDate::from_ymd_opt(2027, 1, 1).unwrap()
        );
    }

    #[test]
    fn a_scaled_clock_runs_faster_and_its_durations_are_shorter_in_real_time() {
        let clock = Clock::scaled(0.001);
        let real = clock.origin + chrono::TimeDelta::seconds(1);
        assert_eq!(
            clock.at(real) - clock.origin,
            chrono::TimeDelta::seconds(1000)
        );
        assert_eq!(
            clock.real_duration(Duration::from_secs(3600)),
            Duration::from_millis(3600)
        );
        assert!(Clock::real().is_real());
    }
}
