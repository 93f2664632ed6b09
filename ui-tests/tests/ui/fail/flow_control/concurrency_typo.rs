//! A misspelt flow-control option gets a suggestion.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("orders/placed", concurency = 4)]
#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    customer_id: u64,
}

fn main() {}
