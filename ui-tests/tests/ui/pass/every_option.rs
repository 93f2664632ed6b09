//! Every channel option at once, each reflected in the marker's `SPEC`.

use std::time::Duration;

use queue_core::{Channel, Processing, channel};
use serde::{Deserialize, Serialize};

#[channel(
    "payments/captured",
    exactly_once,
    dedup = "1s",
    lease = "10s",
    max_attempts = 3,
    backoff = "500ms"
)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentCaptured {
    pub payment_id: u64,
}

#[channel("payments/refunded", exactly_once, lease = "1h 30m")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentRefunded {
    pub payment_id: u64,
}

fn main() {
    let spec = PaymentCapturedChannel::SPEC;
    assert_eq!(spec.name, "payments/captured");
    assert_eq!(spec.processing, Processing::ExactlyOnce);
    assert_eq!(spec.dedup_window, Duration::from_secs(1));
    assert_eq!(spec.lease, Duration::from_secs(10));
    assert_eq!(spec.max_attempts, 3);
    assert_eq!(spec.backoff, Duration::from_millis(500));
    assert!(spec.deduplicates());

    // `exactly_once` without `dedup` keeps the default window; durations may combine units.
    let spec = <PaymentRefundedChannel as Channel>::SPEC;
    assert_eq!(spec.processing, Processing::ExactlyOnce);
    assert_eq!(spec.dedup_window, queue_core::ChannelSpec::DEFAULT_DEDUP);
    assert_eq!(spec.lease, Duration::from_secs(90 * 60));
}
