//! `concurrency = 0` is refused: no limit is written by leaving the option out.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("orders/placed", concurrency = 0)]
#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    customer_id: u64,
}

fn main() {}
