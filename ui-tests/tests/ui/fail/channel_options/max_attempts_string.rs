use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("user/registered", max_attempts = "3")]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u64,
}

fn main() {}
