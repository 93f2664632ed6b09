use queue_core::channel;

#[channel("user/registered")]
union UserRegistered {
    id: u64,
    code: u32,
}

fn main() {}
