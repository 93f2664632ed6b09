//! A rate whose count is not a number.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("orders/placed", rate = "x/1s")]
#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    customer_id: u64,
}

fn main() {}
