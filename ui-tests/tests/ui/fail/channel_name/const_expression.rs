use queue_core::channel;
use serde::{Deserialize, Serialize};

mod names {
    pub const USER_REGISTERED: &str = "user/registered";
}

#[channel(names::USER_REGISTERED)]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u64,
}

fn main() {}
