//! A cron expression the parser refuses is one error quoting it.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("reports/daily", cron = "61 * * * *")]
#[derive(Default, Serialize, Deserialize)]
struct DailyReport {
    region: String,
}

fn main() {}
