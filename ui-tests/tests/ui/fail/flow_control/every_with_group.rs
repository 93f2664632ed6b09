//! `every` with `group`: a periodic channel produces one message per slot, nothing to order.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("reports/daily", every = "1d", group = region)]
#[derive(Default, Serialize, Deserialize)]
struct DailyReport {
    region: String,
}

fn main() {}
