//! Paced applies: `--max-apply-rate N/DURATION` and `--apply-jitter`. Many Pods watch the same
//! key; without pacing, a burst of changes reloads every app once per change, all at the same
//! instant. The worker asks for a slot when a change is ready; the slot is the first time the
//! rate allows (the oldest apply of the window plus the window), plus a random delay up to the
//! jitter. Changes arriving before the slot replace the waiting value (the newest wins).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::spec::ApplyRate;

pub(crate) struct Pacer {
    rate: Option<ApplyRate>,
    jitter: Duration,
    /// When the applies of the current window happened, oldest first.
    applied: VecDeque<Instant>,
    seed: u64,
}

impl Pacer {
    pub(crate) fn new(rate: Option<ApplyRate>, jitter: Duration) -> Pacer {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let seed = (u64::from(nanos) << 16) ^ u64::from(std::process::id()) | 1;
        Pacer { rate, jitter, applied: VecDeque::new(), seed }
    }

    /// Whether changes can wait here at all (otherwise they are applied when ready).
    pub(crate) fn is_active(&self) -> bool {
        self.rate.is_some() || !self.jitter.is_zero()
    }

    fn forget_before(&mut self, now: Instant) {
        if let Some(rate) = self.rate {
            while self.applied.front().is_some_and(|at| *at + rate.per <= now) {
                self.applied.pop_front();
            }
        }
    }

    /// When a change ready at `ready` may be applied.
    pub(crate) fn slot(&mut self, ready: Instant) -> Instant {
        self.forget_before(ready);
        let allowed = match self.rate {
            Some(rate) if self.applied.len() >= rate.count as usize => {
                self.applied[self.applied.len() - rate.count as usize] + rate.per
            }
            _ => ready,
        };
        allowed.max(ready) + self.jitter_delay()
    }

    /// A random delay in `[0, jitter]`.
    pub(crate) fn jitter_delay(&mut self) -> Duration {
        if self.jitter.is_zero() {
            return Duration::ZERO;
        }
        // xorshift64: enough randomness to spread a fleet, no dependency.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        Duration::from_nanos(self.seed % (self.jitter.as_nanos() as u64).saturating_add(1))
    }

    /// An apply happened at `at`: it counts against the rate.
    pub(crate) fn record(&mut self, at: Instant) {
        if let Some(rate) = self.rate {
            self.applied.push_back(at);
            while self.applied.len() > rate.count as usize {
                self.applied.pop_front();
            }
        }
    }

    /// Applies within the window that ends now.
    pub(crate) fn in_window(&mut self, now: Instant) -> usize {
        self.forget_before(now);
        self.applied.len()
    }
}

/// An instant as wall-clock time, for the admin API.
pub(crate) fn rfc3339_at(at: Instant) -> String {
    let now = Instant::now();
    let wall = time::OffsetDateTime::now_utc() + at.saturating_duration_since(now) - now.saturating_duration_since(at);
    wall.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_lets_n_applies_through_then_waits_for_the_oldest_to_leave_the_window() {
        let rate = ApplyRate { count: 3, per: Duration::from_secs(60) };
        let mut pacer = Pacer::new(Some(rate), Duration::ZERO);
        let t0 = Instant::now();
        for i in 0..3 {
            let at = t0 + Duration::from_secs(i);
            assert_eq!(pacer.slot(at), at, "apply {i} is within the rate");
            pacer.record(at);
        }
        // The fourth waits until the first is a minute old.
        let ready = t0 + Duration::from_secs(10);
        assert_eq!(pacer.slot(ready), t0 + Duration::from_secs(60));
        assert_eq!(pacer.in_window(ready), 3);
        pacer.record(t0 + Duration::from_secs(60));
        // The next after that: when the second is a minute old.
        assert_eq!(pacer.slot(t0 + Duration::from_secs(60)), t0 + Duration::from_secs(61));
        assert_eq!(pacer.in_window(t0 + Duration::from_secs(119)), 1);
        assert_eq!(pacer.in_window(t0 + Duration::from_secs(120)), 0);
    }

    #[test]
    fn jitter_stays_within_its_bound_and_spreads() {
        let jitter = Duration::from_millis(500);
        let mut pacer = Pacer::new(None, jitter);
        let delays: Vec<Duration> = (0..10_000).map(|_| pacer.jitter_delay()).collect();
        assert!(delays.iter().all(|d| *d <= jitter), "a delay above the bound");
        let (min, max) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
        assert!(*min < Duration::from_millis(10) && *max > Duration::from_millis(490), "{min:?}..{max:?}");
        let mean = delays.iter().sum::<Duration>() / delays.len() as u32;
        assert!(mean > Duration::from_millis(225) && mean < Duration::from_millis(275), "mean {mean:?}");
        let ready = Instant::now();
        let slot = pacer.slot(ready);
        assert!(slot >= ready && slot <= ready + jitter);
        assert!(!Pacer::new(None, Duration::ZERO).is_active());
    }
}
