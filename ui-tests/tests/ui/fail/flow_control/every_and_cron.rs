//! `every` and `cron` together: a periodic channel has one schedule.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("reports/daily", every = "1d", cron = "0 0 * * *")]
#[derive(Default, Serialize, Deserialize)]
struct DailyReport {}

fn main() {}
