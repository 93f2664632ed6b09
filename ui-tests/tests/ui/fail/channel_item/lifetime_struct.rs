use queue_core::channel;
use serde::{Deserialize, Serialize};

#[channel("user/registered")]
#[derive(Serialize, Deserialize)]
struct UserRegistered<'a> {
    name: &'a str,
}

fn main() {}
