use std::cell::Cell;

use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("user/registered")]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    visits: Cell<u64>,
}

fn main() {}
