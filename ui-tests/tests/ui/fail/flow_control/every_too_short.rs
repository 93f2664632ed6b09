//! `every` shorter than a second.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("reports/tick", every = "500ms")]
#[derive(Default, Serialize, Deserialize)]
struct DailyReport {
    region: String,
}

fn main() {}
