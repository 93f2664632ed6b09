//! Flow-control options: each is reflected in the marker's `SPEC`; `group = field` makes
//! `Message::group` hash the field, and only a periodic channel gives a message per slot.

use std::time::Duration;

use queue_core::{Channel, ChannelSpec, GroupKey, Message, Processing, Rate, Schedule, channel};
use serde::{Deserialize, Serialize};

#[channel(
    "orders/placed",
    group = customer_id,
    concurrency = 16,
    concurrency_per_group = 2,
    rate = "100/1s",
    rate_per_group = "5000/1m"
)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub customer_id: String,
    pub total_cents: u64,
}

/// A group field of an integer type.
#[channel("orders/shipped", group = order_id)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderShipped {
    pub order_id: u32,
}

/// `concurrency` alone, and an enum: limits need no field.
#[channel("audit/events", concurrency = 1, rate = "1/1ms")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AuditEvent {
    Login { user: String },
    Logout { user: String },
}

#[channel("reports/daily", every = "1d", concurrency = 1)]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DailyReport {
    pub region: String,
}

/// `exactly_once` beside a schedule is allowed, and redundant.
#[channel("reports/hourly", exactly_once, every = "1h 30m")]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HourlyReport;

fn main() {
    let spec = OrderPlacedChannel::SPEC;
    assert_eq!(spec.concurrency, 16);
    assert_eq!(spec.concurrency_per_group, 2);
    assert_eq!(
        spec.rate,
        Some(Rate {
            limit: 100,
            per: Duration::from_secs(1)
        })
    );
    assert_eq!(
        spec.rate_per_group,
        Some(Rate {
            limit: 5000,
            per: Duration::from_secs(60)
        })
    );
    assert_eq!(spec.schedule, None);
    assert_eq!(spec.processing, Processing::AtLeastOnce);
    assert!(spec.check().is_ok());

    let order = OrderPlaced {
        customer_id: "c-42".into(),
        total_cents: 1250,
    };
    assert_eq!(order.group(), Some("c-42".group_hash()));
    assert_eq!(
        order.group(),
        Some(GroupKey::group_hash(&order.customer_id))
    );
    assert_ne!(
        order.group(),
        OrderPlaced {
            customer_id: "c-43".into(),
            total_cents: 1250,
        }
        .group()
    );
    assert_eq!(OrderPlaced::for_slot(0), None);

    // An integer group hashes as its value, whatever its width.
    assert_eq!(
        OrderShipped { order_id: 7 }.group(),
        Some(7u64.group_hash())
    );

    // Without `group`, messages belong to no group and the per-group limit keeps its default.
    let spec = AuditEventChannel::SPEC;
    assert_eq!(spec.concurrency, 1);
    assert_eq!(spec.concurrency_per_group, 1);
    assert_eq!(spec.rate.map(|r| r.per), Some(Duration::from_millis(1)));
    assert_eq!(spec.rate_per_group, None);
    assert_eq!(AuditEvent::Login { user: "ada".into() }.group(), None);
    assert!(AuditEvent::for_slot(0).is_none());

    // A periodic channel is exactly once, deduplicated over its period.
    let spec = DailyReportChannel::SPEC;
    assert_eq!(
        spec.schedule,
        Some(Schedule::Every(Duration::from_secs(86_400)))
    );
    assert_eq!(spec.processing, Processing::ExactlyOnce);
    assert_eq!(spec.dedup_window, Duration::from_secs(86_400));
    assert_eq!(spec.concurrency, 1);
    assert!(spec.check().is_ok());
    assert_eq!(
        DailyReport::for_slot(1_767_225_600_000),
        Some(DailyReport::default())
    );
    assert_eq!(
        DailyReport {
            region: "eu".into()
        }
        .group(),
        None
    );

    let spec = <HourlyReportChannel as Channel>::SPEC;
    assert_eq!(
        spec.schedule,
        Some(Schedule::Every(Duration::from_secs(90 * 60)))
    );
    assert_eq!(spec.processing, Processing::ExactlyOnce);
    assert_eq!(spec.dedup_window, Duration::from_secs(90 * 60));
    assert_eq!(HourlyReport::for_slot(0), Some(HourlyReport));

    // Limits left out keep the defaults.
    let plain = ChannelSpec::new("plain");
    assert_eq!(OrderShippedChannel::SPEC.concurrency, plain.concurrency);
    assert_eq!(OrderShippedChannel::SPEC.rate, plain.rate);
}
