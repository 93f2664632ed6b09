use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel(42)]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u64,
}

fn main() {}
