//! `every` written as a number.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("reports/tick", every = 60)]
#[derive(Default, Serialize, Deserialize)]
struct DailyReport {
    region: String,
}

fn main() {}
