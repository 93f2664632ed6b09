use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel(lease = "30s", "user/registered")]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u64,
}

fn main() {}
