use queue_core::{channel, consumer};
use serde::{Deserialize, Serialize};

#[channel("user/registered")]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u64,
}

struct MailError;

#[consumer]
async fn send_welcome(_event: UserRegistered) -> Result<(), MailError> {
    Err(MailError)
}

fn main() {}
