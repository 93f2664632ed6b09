//! The `group` field written as a string: the identifier form is suggested.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("orders/placed", group = "customer_id")]
#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    customer_id: u64,
}

fn main() {}
