use queue_core::{channel, consumer};
use serde::{Deserialize, Serialize};

#[channel("user/registered")]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u64,
}

#[consumer]
async fn send_welcome(_event: UserRegistered, _sender: impl std::fmt::Display) {}

fn main() {}
