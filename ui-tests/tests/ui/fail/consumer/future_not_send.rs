use queue_core::{channel, consumer};
use serde::{Deserialize, Serialize};

#[channel("user/registered")]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u64,
}

use std::rc::Rc;

async fn lookup(id: u64) -> u64 {
    id
}

#[consumer]
async fn send_welcome(event: UserRegistered) {
    let shared = Rc::new(event.id);
    lookup(*shared).await;
}

fn main() {}
