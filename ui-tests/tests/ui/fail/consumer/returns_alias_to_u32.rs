use queue_core::{channel, consumer};
use serde::{Deserialize, Serialize};

#[channel("user/registered")]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u64,
}

type Sent = Result<u32, String>;

#[consumer]
async fn send_welcome(event: UserRegistered) -> Sent {
    Ok(event.id as u32)
}

fn main() {}
