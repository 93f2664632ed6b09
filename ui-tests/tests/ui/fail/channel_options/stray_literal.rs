use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("user/registered", "30s")]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u64,
}

fn main() {}
