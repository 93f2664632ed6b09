//! A cron expression that never fires twice (30 February).

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("reports/leap", cron = "0 0 30 2 *")]
#[derive(Default, Serialize, Deserialize)]
struct DailyReport {
    region: String,
}

fn main() {}
