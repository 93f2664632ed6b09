//! `every` with `at_least_once`: a periodic channel is exactly once.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("reports/daily", at_least_once, every = "1d")]
#[derive(Default, Serialize, Deserialize)]
struct DailyReport {
    region: String,
}

fn main() {}
