//! `every` with `dedup`: a periodic channel deduplicates on its slot.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("reports/daily", exactly_once, every = "1d", dedup = "1h")]
#[derive(Default, Serialize, Deserialize)]
struct DailyReport {
    region: String,
}

fn main() {}
