use queue_core::{channel, consumer};
use serde::{Deserialize, Serialize};

#[channel("user/registered")]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u64,
}

#[consumer]
async fn send_welcome(event: UserRegistered) -> u32 {
    event.id as u32
}

fn main() {}
