//! A rate of zero per window would never deliver.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("orders/placed", rate = "0/1s")]
#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    customer_id: u64,
}

fn main() {}
