use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("user/registered", backoff = "")]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u64,
}

fn main() {}
