use queue_core::{channel, consumer};
use serde::{Deserialize, Serialize};

#[channel("user/registered")]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u64,
}

#[consumer]
struct SendWelcome;

fn main() {}
