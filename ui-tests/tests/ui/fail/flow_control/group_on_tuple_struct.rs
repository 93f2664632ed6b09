//! `group` on a tuple struct: its fields have no names to give.

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("orders/placed", group = customer_id)]
#[derive(Serialize, Deserialize)]
struct OrderPlaced(u64);

fn main() {}
