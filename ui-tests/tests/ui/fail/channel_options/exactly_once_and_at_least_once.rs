use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("user/registered", exactly_once, at_least_once)]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u64,
}

fn main() {}
