use queue_core::channel;
use serde::{Deserialize, Serialize};

const NAME: &str = "user/registered";

#[channel(NAME)]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u64,
}

fn main() {}
