//! The one clock every time rule reads: leases, backoff, delays and dedup windows.
//!
//! Production code uses the system clock from `queue-runtime`; tests use [`VirtualClock`],
//! which moves only when told to.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::future::BoxFuture;

/// Milliseconds since the Unix epoch.
pub type Timestamp = u64;

/// Converts a duration to whole milliseconds, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A source of time and timers.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
    /// A future that completes once [`Clock::now`] has reached `deadline`.
    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()>;
}

/// A clock that moves only by [`VirtualClock::advance`], for deterministic tests of leases,
/// backoff, delays and dedup windows.
#[derive(Clone, Debug)]
pub struct VirtualClock {
    inner: Arc<VirtualInner>,
}

#[derive(Debug)]
struct VirtualInner {
    now: Mutex<Timestamp>,
    sleepers: Mutex<HashMap<u64, (Timestamp, Waker)>>,
    next_id: AtomicU64,
}

impl VirtualClock {
    /// A clock starting at `start`.
    pub fn new(start: Timestamp) -> Self {
        VirtualClock {
            inner: Arc::new(VirtualInner {
                now: Mutex::new(start),
                sleepers: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// Moves time forward and wakes every sleeper whose deadline has come.
    pub fn advance(&self, by: Duration) {
        let now = {
            let mut now = self.inner.now.lock().unwrap_or_else(|e| e.into_inner());
            *now = now.saturating_add(millis(by));
            *now
        };
        let due: Vec<Waker> = {
            let mut sleepers = self
                .inner
                .sleepers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let ids: Vec<u64> = sleepers
                .iter()
                .filter(|(_, (deadline, _))| *deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| sleepers.remove(&id).map(|(_, w)| w))
                .collect()
        };
        for waker in due {
            waker.wake();
        }
    }

    /// How many timers are waiting.
    pub fn sleepers(&self) -> usize {
        self.inner.sleepers.lock().map(|s| s.len()).unwrap_or(0)
    }
}

impl Default for VirtualClock {
    fn default() -> Self {
        // 2026-01-01T00:00:00Z: a plausible wall time, so timestamps look like real ones.
        VirtualClock::new(1_767_225_600_000)
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> Timestamp {
        *self.inner.now.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        Box::pin(VirtualSleep {
            inner: self.inner.clone(),
            id,
            deadline,
        })
    }
}

struct VirtualSleep {
    inner: Arc<VirtualInner>,
    id: u64,
    deadline: Timestamp,
}

impl Future for VirtualSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let now = *self.inner.now.lock().unwrap_or_else(|e| e.into_inner());
        let mut sleepers = self
            .inner
            .sleepers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if now >= self.deadline {
            sleepers.remove(&self.id);
            return Poll::Ready(());
        }
        sleepers.insert(self.id, (self.deadline, cx.waker().clone()));
        Poll::Pending
    }
}

impl Drop for VirtualSleep {
    fn drop(&mut self) {
        if let Ok(mut s) = self.inner.sleepers.lock() {
            s.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn a_virtual_sleep_completes_only_after_advance_reaches_its_deadline() {
        let clock = VirtualClock::new(1_000);
        let mut sleep = clock.sleep_until(1_500);
        assert!((&mut sleep).now_or_never().is_none());
        assert_eq!(clock.sleepers(), 1);
        clock.advance(Duration::from_millis(499));
        assert!((&mut sleep).now_or_never().is_none());
        clock.advance(Duration::from_millis(1));
        assert!((&mut sleep).now_or_never().is_some());
        assert_eq!(clock.now(), 1_500);
        assert_eq!(clock.sleepers(), 0);
    }

    #[test]
    fn a_dropped_sleep_leaves_no_timer_behind() {
        let clock = VirtualClock::new(0);
        let mut sleep = clock.sleep_until(10);
        assert!((&mut sleep).now_or_never().is_none());
        drop(sleep);
        assert_eq!(clock.sleepers(), 0);
    }
}
