//! The system clock and the tokio spawner that production queues use.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use queue_core::Spawn;
use queue_core::clock::{Clock, Timestamp};

/// Wall-clock time in milliseconds; timers on tokio.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    fn sleep_until(&self, deadline: Timestamp) -> BoxFuture<'static, ()> {
        let wait = deadline.saturating_sub(self.now());
        tokio::time::sleep(Duration::from_millis(wait)).boxed()
    }
}

/// Spawns on the tokio runtime that was current when the queue was opened.
#[derive(Debug, Clone)]
pub struct TokioSpawner {
    handle: tokio::runtime::Handle,
}

impl TokioSpawner {
    /// The spawner of the current runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn current() -> Self {
        TokioSpawner {
            handle: tokio::runtime::Handle::current(),
        }
    }
}

impl Spawn for TokioSpawner {
    fn spawn(&self, future: BoxFuture<'static, ()>) {
        drop(self.handle.spawn(future));
    }
}
