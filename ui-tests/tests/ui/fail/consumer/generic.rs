use queue_core::{channel, consumer};
use serde::{Deserialize, Serialize};

#[channel("user/registered")]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u64,
}

trait Notify {}

#[consumer]
async fn send_welcome<N: Notify>(_event: UserRegistered) {}

fn main() {}
