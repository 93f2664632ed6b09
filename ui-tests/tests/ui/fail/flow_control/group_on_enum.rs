//! `group` on an enum: there is no field to name.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("orders/events", group = customer_id)]
#[derive(Serialize, Deserialize)]
enum OrderEvent {
    Placed { customer_id: u64 },
    Cancelled { customer_id: u64 },
}

fn main() {}
