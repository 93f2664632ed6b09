//! `cron` channels: five fields or six (seconds first), in UTC; the dedup window is the
//! longest gap between slots, computed at compile time.

use std::time::Duration;

use queue_core::{Channel, Message, Processing, Schedule, channel};
use serde::{Deserialize, Serialize};

#[channel("reports/nightly", cron = "0 0 * * *")]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NightlyReport {
    pub pages: u32,
}

/// Six fields: every ten seconds.
#[channel("health/ping", cron = "*/10 * * * * *", exactly_once)]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ping;

/// Weekdays at 09:00: the longest gap spans the weekend.
#[channel("standup/reminder", cron = "0 9 * * 1-5", rate = "1/1s")]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum Reminder {
    #[default]
    Standup,
}

fn main() {
    let spec = NightlyReportChannel::SPEC;
    assert_eq!(spec.schedule, Some(Schedule::Cron("0 0 * * *".into())));
    assert_eq!(spec.processing, Processing::ExactlyOnce);
    assert_eq!(spec.dedup_window, Duration::from_secs(86_400));
    assert!(spec.check().is_ok());
    assert_eq!(NightlyReport::for_slot(0), Some(NightlyReport::default()));

    let spec = <PingChannel as Channel>::SPEC;
    assert_eq!(spec.schedule, Some(Schedule::Cron("*/10 * * * * *".into())));
    assert_eq!(spec.dedup_window, Duration::from_secs(10));
    assert!(spec.check().is_ok());
    // 2026-01-01T00:00:00Z, then ten seconds later.
    let new_year = 1_767_225_600_000;
    assert_eq!(
        spec.schedule.as_ref().and_then(|s| s.next_after(new_year)),
        Some(new_year + 10_000)
    );
    assert_eq!(Ping::for_slot(new_year), Some(Ping));
    assert_eq!(Ping.group(), None);

    let spec = ReminderChannel::SPEC;
    assert_eq!(spec.dedup_window, Duration::from_secs(3 * 86_400));
    assert_eq!(spec.rate.map(|r| r.limit), Some(1));
    assert_eq!(Reminder::for_slot(0), Some(Reminder::Standup));
}
