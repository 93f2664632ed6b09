use queue_core::channel;
use serde::Serialize;

#[channel("user/registered")]
#[derive(Serialize)]
struct UserRegistered {
    id: u64,
}

fn main() {}
