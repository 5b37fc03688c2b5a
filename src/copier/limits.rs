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
