//! `cron` with `group`: one message per slot, nothing to order.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("reports/daily", cron = "0 0 * * *", group = region)]
#[derive(Default, Serialize, Deserialize)]
struct DailyReport {
    region: String,
}

fn main() {}
