use queue_core::{channel, consumer};
use serde::{Deserialize, Serialize};

#[channel("user/registered")]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u64,
}

struct Mailer;

impl Mailer {
    #[consumer]
    async fn send_welcome(&self, _event: UserRegistered) {}
}

fn main() {}
