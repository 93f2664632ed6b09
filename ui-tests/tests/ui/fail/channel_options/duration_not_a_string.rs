use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("user/registered", lease = 30)]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u64,
}

fn main() {}
