use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("user/registered")]
#[derive(Serialize, Deserialize)]
struct UserRegistered
where
    u64: Copy,
{
    id: u64,
}

fn main() {}
