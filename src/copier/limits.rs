//! The copier's pacing: token buckets for bytes/s and operations/s (changeable while it
//! runs), the rate parser behind `--bwlimit`, and the rate meter `status` shows.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A token bucket: `rate` units per second (0: unlimited), bursts of one second.
pub struct Limiter {
    rate: AtomicU64,
    state: Mutex<(Instant, f64)>,
}

impl Limiter {
    pub fn new(rate: u64) -> Limiter {
        Limiter {
            rate: AtomicU64::new(rate),
            state: Mutex::new((Instant::now(), rate as f64)),
        }
    }

    pub fn set(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Take `n` units, sleeping as long as the rate requires (callers may go into debt: a
    /// chunk larger than a second's worth is simply followed by a longer sleep).
    pub fn take(&self, n: u64, stop: &AtomicBool) {
        self.take_unless(n, &|| stop.load(Ordering::Relaxed));
    }

    /// [`Limiter::take`], cutting the sleep short as soon as `done()` (checked every 100 ms).
    pub fn take_unless(&self, n: u64, done: &dyn Fn() -> bool) {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return;
        }
        let wait = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let refill = now.duration_since(st.0).as_secs_f64() * rate as f64;
            st.0 = now;
            st.1 = (st.1 + refill).min(rate as f64) - n as f64;
            if st.1 < 0.0 {
                Duration::from_secs_f64(-st.1 / rate as f64)
            } else {
                Duration::ZERO
            }
        };
        // Sleep in slices so a lowered limit or a stop takes effect soon.
        let until = Instant::now() + wait;
        while Instant::now() < until && !done() {
            std::thread::sleep((until - Instant::now()).min(Duration::from_millis(100)));
        }
    }
}

/// Parse a rate such as `50M`, `1.5G`, `800k` or `12345` (bytes per second). The unit may be
/// written `M`, `MB` or `MiB`, with or without `/s`: k, M, G and T are powers of 1024 however
/// written. `0` means unlimited.
pub fn parse_rate(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let bad = || format!("bad rate {s:?}: expected a number with an optional k/M/G/T (e.g. 50M)");
    let mut unit = s.strip_suffix("/s").unwrap_or(s);
    let digits = unit
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unit.len());
    let num = &unit[..digits];
    unit = unit[digits..].trim_start();
    let upper = unit.to_ascii_uppercase();
    let prefix = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let mult: u64 = match prefix {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(format!("bad rate {s:?}: unknown unit {unit:?}")),
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 {
        return Err(bad());
    }
    Ok((v * mult as f64) as u64)
}

/// A bandwidth limit by time of day and weekday, as rclone writes it:
/// `"08:00,20M 18:00,off"` (every day), `"Mon-08:00,20M Sat-00:00,off"` (by weekday), or the
/// two mixed (an entry without a weekday holds on every day). Each entry holds from its time
/// until the next entry's; before the first entry of the week the last one holds. `off` (or
/// `0`) is no limit. A single rate (`50M`) is a table of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timetable {
    /// (minute of the week from Monday 00:00, bytes/s), sorted; never empty.
    slots: Vec<(u32, u64)>,
    /// The text it was read from.
    pub text: String,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const WEEK_MINUTES: u32 = 7 * 24 * 60;

impl Timetable {
    pub fn parse(s: &str) -> std::result::Result<Timetable, String> {
        let text = s.trim().to_string();
        if !text.contains(',') {
            let rate = parse_limit(&text)
                .map_err(|e| format!("{e}, nor a timetable such as \"08:00,20M 18:00,off\""))?;
            return Ok(Timetable {
                slots: vec![(0, rate)],
                text,
            });
        }
        let mut slots = Vec::new();
        for entry in text.split_whitespace() {
            let bad = |why: &str| {
                format!(
                    "bad bandwidth timetable entry {entry:?}: {why} (expected HH:MM,RATE or \
                     Mon-HH:MM,RATE, e.g. \"08:00,20M 18:00,off\")"
                )
            };
            let (when, rate) = entry.split_once(',').ok_or_else(|| bad("no comma"))?;
            if rate.contains(':') {
                return Err(bad(
                    "separate upload:download rates do not apply to the copier",
                ));
            }
            let rate = parse_limit(rate).map_err(|e| bad(&e))?;
            let (day, hm) = match when.split_once('-') {
                Some((d, hm)) => {
                    let d = d.to_ascii_lowercase();
                    let i = DAYS
                        .iter()
                        .position(|x| d == *x || day_name(x) == d)
                        .ok_or_else(|| bad("unknown weekday"))?;
                    (Some(i as u32), hm)
                }
                None => (None, when),
            };
            let (h, m) = hm.split_once(':').ok_or_else(|| bad("time is not HH:MM"))?;
            let (h, m): (u32, u32) = match (h.parse(), m.parse()) {
                (Ok(h), Ok(m)) if h < 24 && m < 60 && m_len_ok(hm) => (h, m),
                _ => return Err(bad("time is not HH:MM")),
            };
            let minute = h * 60 + m;
            match day {
                Some(d) => slots.push((d * 1440 + minute, rate)),
                None => slots.extend((0..7).map(|d| (d * 1440 + minute, rate))),
            }
        }
        slots.sort_by_key(|(at, _)| *at);
        for w in slots.windows(2) {
            if w[0].0 == w[1].0 {
                return Err(format!(
                    "bad bandwidth timetable {text:?}: two entries for the same time"
                ));
            }
        }
        Ok(Timetable { slots, text })
    }

    /// One rate at all times.
    pub fn constant(rate: u64) -> Timetable {
        Timetable {
            slots: vec![(0, rate)],
            text: rate.to_string(),
        }
    }

    /// Whether the rate changes over the week.
    pub fn varies(&self) -> bool {
        self.slots.len() > 1
    }

    /// The rate in force `minute` minutes after Monday 00:00.
    pub fn rate_at(&self, minute: u32) -> u64 {
        let minute = minute % WEEK_MINUTES;
        match self.slots.iter().rev().find(|(at, _)| *at <= minute) {
            Some((_, r)) => *r,
            // Before the week's first entry: the last one still holds.
            None => self.slots.last().map_or(0, |(_, r)| *r),
        }
    }

    /// The rate in force now, by the local time.
    pub fn rate_now(&self) -> u64 {
        self.rate_at(local_minute_of_week())
    }
}

fn day_name(d: &str) -> &'static str {
    match d {
        "mon" => "monday",
        "tue" => "tuesday",
        "wed" => "wednesday",
        "thu" => "thursday",
        "fri" => "friday",
        "sat" => "saturday",
        _ => "sunday",
    }
}

/// Minutes written with two digits (`8:5` is not a time).
fn m_len_ok(hm: &str) -> bool {
    hm.split_once(':').is_some_and(|(_, m)| m.len() == 2)
}

/// A rate, or `off` for none.
fn parse_limit(s: &str) -> std::result::Result<u64, String> {
    if s.eq_ignore_ascii_case("off") {
        Ok(0)
    } else {
        parse_rate(s)
    }
}

/// Minutes since Monday 00:00, local time (the machine's time zone, as rclone uses).
pub fn local_minute_of_week() -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: localtime_r writes only the given tm; both pointers are valid for the call.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return 0;
        }
        tm
    };
    let day = (tm.tm_wday as u32 + 6) % 7; // tm_wday: 0 is Sunday
    day * 1440 + tm.tm_hour as u32 * 60 + tm.tm_min as u32
}

/// Bytes per second over a sliding window of about ten seconds.
#[derive(Default)]
pub struct RateMeter {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl RateMeter {
    /// Add the current byte count; returns the rate.
    pub fn sample(&mut self, bytes: u64) -> u64 {
        let now = Instant::now();
        self.samples.push_back((now, bytes));
        while self.samples.len() > 11 {
            self.samples.pop_front();
        }
        let (t0, b0) = self.samples[0];
        let secs = now.duration_since(t0).as_secs_f64();
        if secs < 0.5 {
            return 0;
        }
        (bytes.saturating_sub(b0) as f64 / secs) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("50M").unwrap(), 50 << 20);
        assert_eq!(parse_rate("1.5k").unwrap(), 1536);
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert_eq!(parse_rate("123").unwrap(), 123);
        assert!(parse_rate("12Q").is_err());
        assert!(parse_rate("fast").is_err());
        for s in ["50MB", "50MiB", "50M/s", "50 MiB/s", "50mb"] {
            assert_eq!(parse_rate(s).unwrap(), 50 << 20, "{s}");
        }
        assert_eq!(parse_rate("100B").unwrap(), 100);
        assert_eq!(parse_rate("2KiB").unwrap(), 2048);
        assert!(parse_rate("5MQ").is_err());
        assert!(parse_rate("-5M").is_err());
        assert!(parse_rate("").is_err());
    }

    #[test]
    fn timetables_parse_and_give_the_rate_in_force() {
        let day = |d: u32, h: u32, m: u32| d * 1440 + h * 60 + m;
        // Every day.
        let t = Timetable::parse("08:00,20M 18:00,off").unwrap();
        assert!(t.varies());
        assert_eq!(
            t.rate_at(day(2, 7, 59)),
            0,
            "before 08:00: last evening's off"
        );
        assert_eq!(t.rate_at(day(2, 8, 0)), 20 << 20);
        assert_eq!(t.rate_at(day(2, 17, 59)), 20 << 20);
        assert_eq!(t.rate_at(day(2, 18, 0)), 0);
        assert_eq!(
            t.rate_at(day(0, 0, 0)),
            0,
            "Monday at midnight: Sunday's 18:00 off"
        );
        // By weekday, mixed with a daily entry; a week wraps.
        let t =
            Timetable::parse("Mon-00:00,512k Fri-23:59,10M Sat-10:00,1M Sun-20:00,off 12:00,2M")
                .unwrap();
        assert_eq!(t.rate_at(day(0, 0, 0)), 512 << 10);
        assert_eq!(t.rate_at(day(0, 12, 0)), 2 << 20, "the daily noon entry");
        assert_eq!(t.rate_at(day(4, 23, 59)), 10 << 20);
        assert_eq!(t.rate_at(day(5, 10, 30)), 1 << 20);
        assert_eq!(t.rate_at(day(5, 12, 30)), 2 << 20);
        assert_eq!(t.rate_at(day(6, 20, 0)), 0);
        assert_eq!(t.rate_at(day(6, 23, 59)), 0);
        assert_eq!(t.rate_at(day(7, 0, 0)), 512 << 10, "the next week");
        // A single rate is a table of one entry.
        let t = Timetable::parse("50M").unwrap();
        assert!(!t.varies());
        assert_eq!(t.rate_at(day(3, 3, 3)), 50 << 20);
        assert_eq!(Timetable::parse("off").unwrap().rate_at(0), 0);
        // Mistakes are named.
        for bad in [
            "08:00 20M",
            "25:00,1M",
            "08:60,1M",
            "8:5,1M",
            "Xyz-08:00,1M",
            "08:00,fast",
            "08:00,10M:1M",
            "08:00,1M 08:00,2M",
        ] {
            let e = Timetable::parse(bad).unwrap_err();
            assert!(e.contains("timetable"), "{bad}: {e}");
        }
        assert!(Timetable::parse("Monday-08:00,1M Tue-09:00,2M").is_ok());
    }

    #[test]
    fn limiter_paces() {
        let l = Limiter::new(1000);
        let stop = AtomicBool::new(false);
        let t = Instant::now();
        // A burst of one second is free; the next 500 units cost half a second.
        l.take(1000, &stop);
        l.take(500, &stop);
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(400), "{e:?}");
        assert!(e < Duration::from_secs(2), "{e:?}");
    }
}
