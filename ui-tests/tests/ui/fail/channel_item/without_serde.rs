use queue_core::channel;

#[channel("user/registered")]
struct UserRegistered {
    id: u64,
}

fn main() {}
